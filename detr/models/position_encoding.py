"""Position encodings of feature maps, as in DETR: 2-D sine/cosine and learned row/column embeddings.

Both map a feature map ``x`` [B, C, H, W] and its padding mask [B, H, W] (True = padding) to an
encoding [B, 2 * num_pos_feats, H, W]; the first half encodes y, the second x for the sine variant
(DETR's order), x then y for the learned one (also DETR's order, so converted weights line up).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from detr.errors import InvalidInputError


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of each pixel's (y, x) position counted over valid (non-padding) pixels.

    With ``normalize`` the cumulative positions are divided by the valid height/width and scaled to
    [0, scale]: an image alone and the same image padded inside a batch get the same encoding at
    every valid pixel. ``offset`` is added before normalizing: DETR uses 0, Deformable DETR -0.5
    (pixel centres).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        del x  # only the mask (valid region) matters
        not_mask = ~mask  # [B, H, W]
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W] 1-based row index among valid rows
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        # Frequencies shared by each (sin, cos) pair: temperature^(2i / d).
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # [B, H, W, F]
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embeddings of the row and column index (at most ``max_size`` of each).

    Padding does not change it (indices count from the top-left corner). Feature maps larger than
    ``max_size`` in either direction cannot be encoded and raise ``InvalidInputError``.
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.max_size = max_size
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        del mask
        b, _, h, w = x.shape
        if h > self.max_size or w > self.max_size:
            raise InvalidInputError(
                f"feature map of {h}x{w} is larger than the learned position encoding's "
                f"{self.max_size}x{self.max_size}; use smaller images or position_encoding: sine"
            )
        cols = self.col_embed(torch.arange(w, device=x.device))  # [W, F]
        rows = self.row_embed(torch.arange(h, device=x.device))  # [H, F]
        pos = torch.cat([cols.unsqueeze(0).expand(h, -1, -1), rows.unsqueeze(1).expand(-1, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1)  # [B, 2F, H, W]


def build_position_encoding(kind: str, hidden_dim: int, *, deformable: bool) -> nn.Module:
    """``kind`` is "sine" or "learned"; each half of ``hidden_dim`` encodes one axis."""
    num_pos_feats = hidden_dim // 2
    if kind == "sine":
        return PositionEmbeddingSine(num_pos_feats, normalize=True, offset=-0.5 if deformable else 0.0)
    if kind == "learned":
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"unknown position encoding {kind!r}; accepted: sine, learned")
