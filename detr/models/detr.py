"""DETR (Carion et al. 2020): ResNet features -> transformer -> one class and box per object query.

Classification is a softmax over K classes plus the "no object" class (index K). Forward returns
outputs only; the loss is ``detr.models.criterion.SetCriterion``.

Two-stage DETR (``two_stage=True``, not in the paper and not in official checkpoints): instead of Q
learned queries, every encoder position proposes a box (an encoder class and box head, supervised
by the ``_enc`` losses), the top Q by class score become the decoder's queries, and each decoder
layer predicts its box as an offset of its query's proposal. This is Deformable DETR's two-stage
scheme on DETR's single map, as in Efficient DETR (Yao et al. 2021): the dense encoder loss reaches
every feature position, where learned queries take thousands of steps to find the objects.

Training aids (``aids``, training mode only; ``detr.models.training_queries``): query groups and
one-to-many queries extend the learned queries (two-stage: the one-to-many queries are the next
encoder proposals); denoising queries (two-stage only: they need a reference box, and the
two-stage queries are boxes) take their content from a label embedding and their position and
reference box from the noised box, embedded as a proposal is. In eval mode the forward is the
plain model's, with the same parameters in use.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from detr.errors import InvalidInputError
from detr.models.backbone import Joiner
from detr.models.heads import MLP
from detr.models.inputs import check_model_inputs
from detr.models.proposals import box_sine_embedding, grid_proposals
from detr.models.training_queries import TrainingAids, TrainingAidSettings, TrainsWithAids
from detr.models.transformer import Transformer

# Proposal size on DETR's stride-32 map: Deformable DETR's 0.05 * 2^level with level 0 at stride 8.
_PROPOSAL_SIZE = 0.2


class DETR(TrainsWithAids, nn.Module):
    """Args:
        backbone: a ``Joiner`` returning one level (layer4).
        transformer: the DETR ``Transformer``.
        num_classes: K real classes; the classifier has K + 1 outputs (the last is "no object").
        num_queries: Q object queries, the most objects one image can have.
        aux_loss: also return the predictions of every decoder layer (``aux_outputs``).
        two_stage: queries from the top-Q encoder proposals (adds ``enc_outputs``; see the module doc).
        encoder_content: two-stage only: a query's content also takes the encoder feature of its
            position (Efficient DETR, RT-DETR), not only its box's embedding (Deformable DETR).
        aids: training aids (see the module doc); off by default.
    """

    # How class scores are read: softmax over K + 1 outputs, the last one "no object".
    class_activation = "softmax"

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, two_stage: bool = False, encoder_content: bool = False,
                 aids: TrainingAidSettings = TrainingAidSettings()) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.two_stage = two_stage
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if encoder_content and not two_stage:
            raise ValueError("encoder_content needs two_stage: learned queries have no encoder position")
        if two_stage:
            self.proposals = EncoderProposals(hidden_dim, num_classes, encoder_content=encoder_content)
            # Zero offsets at the start: each query's first box is its proposal.
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        else:
            self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone
        # Last (see TrainsWithAids).
        self._attach_training_aids(aids, num_classes=num_classes, hidden_dim=hidden_dim, query_dim=hidden_dim,
                                   num_queries=num_queries, two_stage=two_stage,
                                   box_queries="two-stage DETR (box queries)")

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None,
                targets: list[dict] | None = None) -> dict:
        """images [B, 3, H, W] normalized; masks [B, H, W] bool, True = padding (None: no padding);
        targets (training with denoising; ignored otherwise): one dict per image, "labels" [N],
        "boxes" [N, 4] normalized cxcywh.

        Returns:
            pred_logits [B, Q, K + 1], pred_boxes [B, Q, 4] normalized cxcywh (relative to the
            unpadded image), and with ``aux_loss`` aux_outputs: one such dict per earlier decoder
            layer; two-stage also enc_outputs: the logits [B, S, K + 1] and boxes [B, S, 4] of every
            encoder position.
        """
        masks = check_model_inputs(images, masks)
        features, level_masks, pos = self.backbone(images, masks)
        src = self.input_proj(features[-1])
        if self.training and hasattr(self, "training_aids"):
            return self._forward_with_aids(src, level_masks[-1], pos[-1], targets)
        out: dict = {}
        if self.two_stage:
            memory, pos_seq, mask_seq = self.transformer.encode(src, level_masks[-1], pos[-1])
            selected = self.proposals(memory, mask_seq, tuple(src.shape[-2:]), self.num_queries)
            hs = self.transformer.decoder(selected.content, memory, pos_seq, selected.query_pos, mask_seq)
            boxes = (self.bbox_embed(hs) + selected.boxes_unact).sigmoid()  # [L, B, Q, 4]
            out["enc_outputs"] = {"pred_logits": selected.enc_logits, "pred_boxes": selected.enc_boxes}
        else:
            hs, _ = self.transformer(src, level_masks[-1], self.query_embed.weight, pos[-1])
            boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        logits = self.class_embed(hs)  # [L, B, Q, K + 1]
        out.update({"pred_logits": logits[-1], "pred_boxes": boxes[-1]})
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


    def _forward_with_aids(self, src: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                           targets: list[dict] | None) -> dict:
        """The training forward with the extra queries of ``training_aids`` (layout and attention
        mask in ``detr.models.training_queries``); the outputs of group 0 are the plain forward's."""
        aids: TrainingAids = self.training_aids
        denoising = aids.denoising_queries(targets)
        layout = aids.layout(denoising)
        b = src.shape[0]
        attn_mask = layout.self_attn_mask(b, self.transformer.nhead, src.device)
        out: dict = {}
        if self.two_stage:
            memory, pos_seq, mask_seq = self.transformer.encode(src, mask, pos)
            selected = self.proposals(memory, mask_seq, tuple(src.shape[-2:]), layout.matching + layout.one_to_many)
            content, query_pos, boxes_unact = selected.content, selected.query_pos, selected.boxes_unact
            if denoising is not None:
                dn_pos, _ = self.proposals.embed(denoising.boxes_unact)
                content = torch.cat([content, denoising.content], 1)
                query_pos = torch.cat([query_pos, dn_pos], 1)
                boxes_unact = torch.cat([boxes_unact, denoising.boxes_unact], 1)
            hs = self.transformer.decoder(content, memory, pos_seq, query_pos, mask_seq, attn_mask)
            boxes = (self.bbox_embed(hs) + boxes_unact).sigmoid()  # [L, B, T, 4]
            out["enc_outputs"] = {"pred_logits": selected.enc_logits, "pred_boxes": selected.enc_boxes}
        else:
            hs, _ = self.transformer(src, mask, aids.learned_queries(self.query_embed.weight), pos, attn_mask)
            boxes = self.bbox_embed(hs).sigmoid()  # [L, B, T, 4]
        logits = self.class_embed(hs) + aids.unused_parameter_guard(denoising)  # [L, B, T, K + 1]
        out.update(layout.split(logits, boxes, self.aux_loss))
        return out


class SelectedQueries(NamedTuple):
    """What the encoder proposals hand the decoder (and the loss)."""

    content: torch.Tensor  # [B, Q, C] decoder input
    query_pos: torch.Tensor  # [B, Q, C] added to the queries in every decoder layer
    boxes_unact: torch.Tensor  # [B, Q, 4] the selected proposals, logit space, no gradient
    enc_logits: torch.Tensor  # [B, S, K + 1] every position's class logits
    enc_boxes: torch.Tensor  # [B, S, 4] every position's refined proposal, cxcywh in [0, 1]


class EncoderProposals(nn.Module):
    """Two-stage DETR's encoder head: a class and a refined box per encoder position, and the top-Q
    positions by their best real-class probability as decoder queries (through a sine embedding
    of their boxes, as two-stage Deformable DETR).

    With ``encoder_content`` a query's content is its box embedding plus the encoder head's feature
    at its position (Efficient DETR, RT-DETR): what the encoder head knows of the object there (its
    class above all) reaches the decoder directly, where the box embedding alone leaves the decoder
    to find it again by global cross-attention.
    """

    def __init__(self, hidden_dim: int, num_classes: int, encoder_content: bool = False) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.encoder_content = encoder_content
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.pos_trans = nn.Linear(hidden_dim * 2, hidden_dim * 2)
        self.pos_trans_norm = nn.LayerNorm(hidden_dim * 2)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, memory: torch.Tensor, padding_mask: torch.Tensor, shape: tuple[int, int],
                num_queries: int) -> SelectedQueries:
        """memory [B, S, C], padding_mask [B, S] (True = padding), shape (H, W) of the map."""
        s = memory.shape[1]
        if num_queries > s:
            raise InvalidInputError(
                f"two-stage DETR selects {num_queries} proposals but the image gives only {s} encoder positions "
                f"(a {shape[0]}x{shape[1]} map at stride 32); use larger images or fewer model.num_queries")
        proposals, invalid = grid_proposals(padding_mask, [shape], [_PROPOSAL_SIZE])  # [B, S, 4], [B, S, 1]
        hidden = self.enc_output_norm(self.enc_output(memory.masked_fill(invalid, 0.0)))
        enc_logits = self.class_embed(hidden)  # [B, S, K + 1]
        # Invalid positions keep +inf logits (box 1, 1, 1, 1): they rank last and match nothing.
        enc_boxes_unact = self.bbox_embed(hidden) + proposals  # [B, S, 4]
        score = enc_logits.softmax(-1)[..., :-1].amax(-1).masked_fill(invalid.squeeze(-1), -1.0)  # [B, S]
        top = score.topk(num_queries, dim=1).indices  # [B, Q]
        # The proposals are the decoder's starting boxes, not a gradient path into the encoder head.
        boxes_unact = torch.gather(enc_boxes_unact, 1, top.unsqueeze(-1).expand(-1, -1, 4)).detach()
        # An image with fewer valid positions than queries (a small one padded in a batch) hands
        # some queries a padding position: they start from the whole-image box, not from +inf.
        boxes_unact = boxes_unact.masked_fill(boxes_unact.isinf(), 0.0)
        query_pos, content = self.embed(boxes_unact)
        if self.encoder_content:
            content = content + torch.gather(hidden, 1, top.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return SelectedQueries(content, query_pos, boxes_unact, enc_logits, enc_boxes_unact.sigmoid())

    def embed(self, boxes_unact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes [B, Q, 4] in logit space -> (query_pos, content) [B, Q, C] each."""
        embedded = self.pos_trans_norm(self.pos_trans(box_sine_embedding(boxes_unact, self.hidden_dim // 2)))
        query_pos, content = embedded.split(self.hidden_dim, dim=-1)
        return query_pos, content
