"""Hungarian matching between predictions and ground-truth boxes (DETR's bipartite matching).

Each target gets exactly one prediction; unmatched predictions are "no object". The cost of a pair
is a weighted sum of a class cost, the L1 distance of the cxcywh boxes and minus their generalized
IoU. The cost matrix of the whole batch is computed at once on the model's device and copied to the
host in one transfer; ``scipy.optimize.linear_sum_assignment`` then solves each image's block.

Query groups (Group DETR, training only): outputs holding K groups of Q queries ("query_groups":
K) are matched group by group, each group one-to-one with all the targets, as K separate
matchings would.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

# Finite stand-in for NaN/inf costs (diverged predictions): the assignment still exists and the
# loss, computed from the same predictions, is non-finite and handled by the trainer's policy.
_NONFINITE_COST = 1e8


class HungarianMatcher(nn.Module):
    """Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs (at least one non-zero).
        class_cost: "softmax" (DETR: -p of the target class) or "focal" (Deformable DETR: the
            focal-loss difference between labelling the prediction positive and negative).
        focal_alpha, focal_gamma: focal cost parameters (only with ``class_cost="focal"``).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: Literal["softmax", "focal"] = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0: the matching would be arbitrary")
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"unknown class cost {class_cost!r}; accepted: softmax, focal")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost = class_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """The batched cost [B, Q, T] between every prediction and every target of the batch
        (T = all targets concatenated; only the block of each image's own targets is used)."""
        logits = outputs["pred_logits"].flatten(0, 1)  # [B*Q, K(+1)]
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4] cxcywh
        tgt_ids = torch.cat([t["labels"] for t in targets])  # [T]
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)  # [T, 4] cxcywh
        if self.class_cost == "softmax":
            prob = logits.float().softmax(-1)
            # 1 - p approximated by -p; the constant does not change the matching.
            cost_class = -prob[:, tgt_ids]
        else:
            prob = logits.float().sigmoid()
            a, g = self.focal_alpha, self.focal_gamma
            neg = (1 - a) * prob**g * -(1 - prob + 1e-8).log()
            pos = a * (1 - prob) ** g * -(prob + 1e-8).log()
            cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(tgt_bbox, "cxcywh", "xyxy")
        )
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        b, q = outputs["pred_logits"].shape[:2]
        return cost.view(b, q, -1)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" [B, Q, K(+1)], "pred_boxes" [B, Q, 4] normalized cxcywh.
            targets: B dicts, "labels" int64 [N_i], "boxes" [N_i, 4] normalized cxcywh.

        Returns:
            B pairs (index_i, index_j) of int64 CPU tensors of length min(Q, N_i): prediction
            index_i[k] is matched to target index_j[k]. With K query groups (outputs["query_groups"]),
            K such matchings per image, group g's prediction indices offset by g * Q.
        """
        groups = outputs.get("query_groups", 1)
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in sizes]
        cost = self.cost_matrix(outputs, targets).cpu().numpy()  # the one device-to-host copy
        if not np.isfinite(cost).all():
            cost = np.nan_to_num(cost, nan=_NONFINITE_COST, posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST)
        indices = []
        start = 0
        for i, n in enumerate(sizes):
            if n == 0:
                indices.append((empty, empty))
                continue
            block = cost[i, :, start : start + n]  # [K * Q, n]
            q = block.shape[0] // groups
            rows, cols = [], []
            for g in range(groups):
                r, c = linear_sum_assignment(block[g * q : (g + 1) * q])
                rows.append(r + g * q)
                cols.append(c)
            indices.append((torch.as_tensor(np.concatenate(rows), dtype=torch.int64),
                            torch.as_tensor(np.concatenate(cols), dtype=torch.int64)))
            start += n
        return indices
