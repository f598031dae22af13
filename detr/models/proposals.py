"""Encoder proposals shared by the two-stage models: one fixed-size box per encoder position, and
the sine embedding that turns a selected box into a decoder query.

Two-stage Deformable DETR (Zhu et al. 2021) ranks these proposals after an encoder head refines
them; two-stage DETR (the same idea on DETR's single level, as Efficient DETR, Yao et al. 2021) does
the same on the stride-32 map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def grid_proposals(
    padding_mask: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]], sizes: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A box centred on every position of every level, ``sizes[level]`` wide and high (a fraction of
    the unpadded image).

    Args:
        padding_mask: [B, S] bool, True = padding, the levels flattened one after another.
        spatial_shapes: (H_l, W_l) of each level; S = sum of H_l * W_l.
        sizes: one box size per level.

    Returns:
        proposals [B, S, 4] cxcywh in logit space (+inf where invalid);
        invalid [B, S, 1] bool: padding, or a box too close to the border (a coordinate outside
        (0.01, 0.99)) to be trusted.
    """
    b = padding_mask.shape[0]
    device = padding_mask.device
    proposals, start = [], 0
    for (h, w), size in zip(spatial_shapes, sizes, strict=True):
        mask_l = padding_mask[:, start : start + h * w].view(b, h, w)
        valid_h = (~mask_l[:, :, 0]).sum(1)
        valid_w = (~mask_l[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)  # [H, W, 2]
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(b, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(b, -1, -1, -1) + 0.5) / scale  # centres in [0, 1] of the image
        wh = torch.ones_like(grid) * size
        proposals.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        start += h * w
    boxes = torch.cat(proposals, 1)  # [B, S, 4]
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    invalid = padding_mask.unsqueeze(-1) | ~valid
    logits = torch.log(boxes / (1 - boxes)).masked_fill(invalid, float("inf"))
    return logits, invalid


def box_sine_embedding(boxes_unact: torch.Tensor, num_feats: int) -> torch.Tensor:
    """Sine embedding of boxes: [B, K, 4] logits -> [B, K, 4 * num_feats] (``num_feats`` features
    per coordinate, alternating sin and cos, temperature 10000 as the position encoding)."""
    temperature = 10000
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes_unact.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = boxes_unact.sigmoid()[:, :, :, None] * scale / dim_t  # [B, K, 4, F]
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)
