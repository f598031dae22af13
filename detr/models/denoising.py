"""Denoising queries (DN-DETR, Li et al. 2022; contrastive negatives from DINO, Zhang et al. 2022).

During training, noised copies of every ground-truth box and label enter the decoder as extra
queries: the box (in logit space) as the query's reference box, the label through a label
embedding as its content. Each positive copy is trained to reconstruct its target's class and box;
with ``contrastive``, a negative copy moved further away is trained to say "no object". The
matching queries cannot see the copies (``detr.models.training_queries`` builds the attention
mask), so nothing learned from the answers leaks into the matched predictions. Inference never
builds them.

Layout of the denoising block of one image: ``groups`` groups of ``slots`` queries, each group
[positives of targets 0..n-1, padding up to the batch's largest n | negatives likewise]. The
padding queries are invisible to every query and take no loss: an image's denoising outputs do not
depend on the other images of its batch (exact gradient accumulation).

Noise (positive copies; negatives use magnitudes in [1, 2) instead of [0, 1)): each corner of the
xyxy box moves by ``box_noise_scale * magnitude * (w/2, h/2)`` in a random direction, the result is
clipped to the image; the label is replaced by a uniformly random class with probability
``label_noise_ratio``. The noise is drawn image by image, in batch order, so a batch and its split
into micro-batches draw the same noise from the same generator state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import box_convert

from detr.models.heads import inverse_sigmoid


@dataclass(frozen=True)
class DenoisingBatch:
    """The denoising queries of a batch (P = groups * slots queries per image)."""

    content: torch.Tensor  # [B, P, C] label embedding of each copy's (noised) label
    boxes_unact: torch.Tensor  # [B, P, 4] noised cxcywh boxes in logit space (0 at padding)
    valid: torch.Tensor  # [B, P] bool: a copy of a real target (False: padding)
    target_index: torch.Tensor  # [B, P] int64: the target a positive copy reconstructs, -1 otherwise
    groups: int
    copies: int  # 1, or 2 with contrastive negatives
    slots: int  # queries per group: copies * the most targets of an image

    @property
    def num_queries(self) -> int:
        return self.groups * self.slots

    def group_of_query(self) -> torch.Tensor:
        """[P] int64: the denoising group of every query."""
        return torch.arange(self.num_queries, device=self.valid.device) // max(self.slots, 1)


class DenoisingQueries(nn.Module):
    """Args:
        num_classes: K; labels are embedded by a [K, C] table (a training-only parameter).
        hidden_dim: C.
        groups: noised copies of every target per image.
        label_noise_ratio: probability that a copy's label is a random class.
        box_noise_scale: how far box corners move, in half widths/heights.
        contrastive: add a negative copy (moved 1-2x as far) per target and group.
    """

    def __init__(self, num_classes: int, hidden_dim: int, groups: int, label_noise_ratio: float,
                 box_noise_scale: float, contrastive: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.groups = groups
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.contrastive = contrastive
        self.label_embed = nn.Embedding(num_classes, hidden_dim)

    def forward(self, targets: list[dict]) -> DenoisingBatch:
        """targets: one dict per image, "labels" int64 [N_i], "boxes" [N_i, 4] normalized cxcywh."""
        weight = self.label_embed.weight
        device = weight.device
        copies = 2 if self.contrastive else 1
        max_n = max((len(t["labels"]) for t in targets), default=0)
        slots = copies * max_n
        b, p = len(targets), self.groups * slots
        labels = torch.zeros(b, p, dtype=torch.int64, device=device)
        boxes_unact = torch.zeros(b, p, 4, device=device)
        valid = torch.zeros(b, p, dtype=torch.bool, device=device)
        target_index = torch.full((b, p), -1, dtype=torch.int64, device=device)
        for i, target in enumerate(targets):
            n = len(target["labels"])
            if n == 0:
                continue
            noised_labels, noised_boxes = self._noise(target["labels"].to(device), target["boxes"].to(device).float(),
                                                      copies)  # [G, copies, n], [G, copies, n, 4]
            # Slot of copy c of target j in group g: g * slots + c * max_n + j.
            slot = (torch.arange(self.groups, device=device).view(-1, 1, 1) * slots
                    + torch.arange(copies, device=device).view(1, -1, 1) * max_n
                    + torch.arange(n, device=device).view(1, 1, -1)).flatten()
            labels[i, slot] = noised_labels.flatten()
            boxes_unact[i, slot] = inverse_sigmoid(noised_boxes.reshape(-1, 4))
            valid[i, slot] = True
            positive = slot.view(self.groups, copies, n)[:, 0].flatten()  # [G * n]
            target_index[i, positive] = torch.arange(n, device=device).repeat(self.groups)
        content = self.label_embed(labels)  # [B, P, C]
        return DenoisingBatch(content, boxes_unact, valid, target_index, self.groups, copies, slots)

    def _noise(self, labels: torch.Tensor, boxes: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        """labels [n], boxes [n, 4] cxcywh -> noised labels [G, copies, n], boxes [G, copies, n, 4] cxcywh."""
        g, n = self.groups, len(labels)
        flip = torch.rand(g, copies, n, device=labels.device) < self.label_noise_ratio
        random_labels = torch.randint(0, self.num_classes, (g, copies, n), device=labels.device)
        noised_labels = torch.where(flip, random_labels, labels.expand(g, copies, n))
        xyxy = box_convert(boxes, "cxcywh", "xyxy")  # [n, 4]
        half = boxes[:, 2:].repeat(1, 2) / 2  # [n, 4] (w/2, h/2, w/2, h/2)
        sign = torch.randint(0, 2, (g, copies, n, 4), device=boxes.device).float() * 2 - 1
        magnitude = torch.rand(g, copies, n, 4, device=boxes.device)
        if copies == 2:
            magnitude[:, 1] += 1.0  # negatives: further than any positive
        moved = (xyxy + sign * magnitude * half * self.box_noise_scale).clamp(0.0, 1.0)
        return noised_labels, box_convert(moved, "xyxy", "cxcywh")
