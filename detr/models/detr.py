"""DETR (Carion et al. 2020): ResNet features -> transformer -> one class and box per object query.

Classification is a softmax over K classes plus the "no object" class (index K). Forward returns
outputs only; the loss is ``detr.models.criterion.SetCriterion``.
"""

from __future__ import annotations

import torch
from torch import nn

from detr.models.backbone import Joiner
from detr.models.heads import MLP
from detr.models.inputs import check_model_inputs
from detr.models.transformer import Transformer


class DETR(nn.Module):
    """Args:
        backbone: a ``Joiner`` returning one level (layer4).
        transformer: the DETR ``Transformer``.
        num_classes: K real classes; the classifier has K + 1 outputs (the last is "no object").
        num_queries: Q object queries, the most objects one image can have.
        aux_loss: also return the predictions of every decoder layer (``aux_outputs``).
    """

    # How class scores are read: softmax over K + 1 outputs, the last one "no object".
    class_activation = "softmax"

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True) -> None:
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """images [B, 3, H, W] normalized; masks [B, H, W] bool, True = padding (None: no padding).

        Returns:
            pred_logits [B, Q, K + 1], pred_boxes [B, Q, 4] normalized cxcywh (relative to the
            unpadded image), and with ``aux_loss`` aux_outputs: one such dict per earlier decoder layer.
        """
        masks = check_model_inputs(images, masks)
        features, level_masks, pos = self.backbone(images, masks)
        hs, _ = self.transformer(self.input_proj(features[-1]), level_masks[-1], self.query_embed.weight, pos[-1])
        logits = self.class_embed(hs)  # [L, B, Q, K + 1]
        boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out
