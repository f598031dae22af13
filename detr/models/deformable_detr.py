"""Deformable DETR (Zhu et al. 2021): multi-scale features, deformable attention, sigmoid classes.

Variants: single-scale (one level, layer4) or multi-scale (layer2..4 plus stride-2 convolutions for
the extra levels), iterative box refinement (one box and class head per decoder layer, each layer
refining the previous layer's boxes) and two-stage (queries from the encoder's top proposals).
Classification is K independent sigmoids (focal loss); there is no "no object" class.

Heads are stored as in the official code: ``class_embed`` and ``bbox_embed`` are ModuleLists with
one entry per prediction (decoder layers, plus one for the encoder proposals in two-stage); without
refinement every entry is the same module. The official code additionally registers the same heads
under ``transformer.decoder``; here they are passed to the transformer at call time, so those
duplicate keys of an official checkpoint are simply dropped by the converter.

Training aids (``aids``, training mode only; ``detr.models.training_queries``): query groups and
one-to-many queries extend the learned queries (two-stage: the one-to-many queries are the next
encoder proposals); denoising queries (two-stage only: their reference is a box, which the
decoder takes only in two-stage) take their content from a label embedding and their position
from the noised box, embedded as a proposal is. In eval mode the forward is the plain model's.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from detr.models.backbone import Joiner
from detr.models.deformable_transformer import DeformableTransformer
from detr.models.heads import MLP, inverse_sigmoid
from detr.models.inputs import check_model_inputs
from detr.models.training_queries import TrainingAids, TrainingAidSettings, TrainsWithAids


class DeformableDETR(TrainsWithAids, nn.Module):
    """Args:
        backbone: a ``Joiner`` returning min(num_feature_levels, 3) levels.
        transformer: the ``DeformableTransformer`` (built with the same levels and two-stage flag).
        num_classes: K; the classifier has K sigmoid outputs.
        num_queries: learned queries Q (single-stage); two-stage uses the transformer's proposals.
        num_feature_levels: L; levels beyond the backbone's come from stride-2 3x3 convolutions.
        aux_loss: return the predictions of every earlier decoder layer (``aux_outputs``).
        with_box_refine: iterative bounding box refinement.
        two_stage: two-stage Deformable DETR (adds ``enc_outputs``).
        aids: training aids (see the module doc); off by default.
    """

    # How class scores are read: K independent sigmoids.
    class_activation = "sigmoid"

    def __init__(
        self,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
        aids: TrainingAidSettings = TrainingAidSettings(),
    ) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_classes = num_classes
        self.num_queries = transformer.two_stage_num_proposals if two_stage else num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.transformer = transformer
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = nn.ModuleList(self._input_projections(backbone.num_channels, hidden_dim, num_feature_levels))
        self.backbone = backbone

        # Focal-loss prior: every class starts at probability 0.01, so the many negatives do not
        # dominate the first updates.
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0.0)

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            # The first layer predicts from the 2-d reference point: start with small boxes.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if two_stage:
            # Reference points are already boxes: predict pure deltas.
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)
        # Last (see TrainsWithAids).
        self._attach_training_aids(aids, num_classes=num_classes, hidden_dim=hidden_dim, query_dim=2 * hidden_dim,
                                   num_queries=self.num_queries, two_stage=two_stage,
                                   box_queries="two-stage Deformable DETR (box reference points)")

    @staticmethod
    def _input_projections(channels: list[int], hidden_dim: int, num_levels: int) -> list[nn.Module]:
        """1x1 conv + GroupNorm per backbone level, then 3x3 stride-2 conv + GroupNorm per extra level."""
        projections: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in channels
        ]
        in_channels = channels[-1]
        for _ in range(num_levels - len(channels)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(32, hidden_dim),
                )
            )
            in_channels = hidden_dim
        return projections

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None,
                targets: list[dict] | None = None) -> dict:
        """images [B, 3, H, W] normalized; masks [B, H, W] bool, True = padding (None: no padding);
        targets (training with denoising; ignored otherwise): one dict per image, "labels" [N],
        "boxes" [N, 4] normalized cxcywh.

        Returns:
            pred_logits [B, Q, K], pred_boxes [B, Q, 4] normalized cxcywh; aux_outputs (with
            ``aux_loss``): one such dict per earlier decoder layer; enc_outputs (two-stage): the
            encoder proposals' pred_logits [B, S, K] and pred_boxes [B, S, 4].
        """
        masks = check_model_inputs(images, masks)
        features, level_masks, pos = self.backbone(images, masks)
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        level_masks = list(level_masks)
        pos = list(pos)
        for lvl in range(len(features), self.num_feature_levels):
            # The first extra level comes from the last backbone map, later ones from the previous level.
            src = self.input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])
            mask = F.interpolate(masks[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            level_masks.append(mask)
            pos.append(self.backbone[1](src, mask).to(src.dtype))

        num_dec = self.transformer.decoder.num_layers
        aids: TrainingAids | None = getattr(self, "training_aids", None) if self.training else None
        layout = denoising = None
        query_embed = None if self.two_stage else self.query_embed.weight
        extra: dict = {}
        if aids is not None:
            denoising = aids.denoising_queries(targets)
            layout = aids.layout(denoising)
            extra["self_attn_mask"] = layout.self_attn_mask(images.shape[0], self.transformer.nhead, images.device)
            if self.two_stage:
                extra["num_proposals"] = layout.matching + layout.one_to_many
                if denoising is not None:
                    extra["extra_box_queries"] = (denoising.content, denoising.boxes_unact)
            else:
                query_embed = aids.learned_queries(query_embed)
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs,
            level_masks,
            pos,
            query_embed,
            bbox_embed=self.bbox_embed if self.with_box_refine else None,
            enc_class_embed=self.class_embed[num_dec] if self.two_stage else None,
            enc_bbox_embed=self.bbox_embed[num_dec] if self.two_stage else None,
            **extra,
        )
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])  # [B, Q, 4]
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:  # a point: only the centre has a prior
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))  # [B, Q, K]
            boxes.append(coord.sigmoid())
        if layout is not None:
            guard = aids.unused_parameter_guard(denoising)
            out = layout.split(torch.stack(logits) + guard, torch.stack(boxes), self.aux_loss)
        else:
            out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
            if self.aux_loss:
                out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out
