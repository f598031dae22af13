"""The multi-scale deformable attention module (Zhu et al. 2021, eq. 3).

Each query attends to ``n_points`` sampled locations per head and level around its reference point;
offsets and attention weights are linear functions of the query. The sampling itself is
``detr.ops.ms_deform_attn`` (reference, native CPU or CUDA backend, chosen there).
Parameter names and initialisation follow the official code so checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detr.models import inplace
from detr.ops import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Args:
        d_model: width C of queries and values.
        n_levels: feature levels L.
        n_heads: attention heads M (C must be divisible by M; each head has D = C / M channels).
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the paper: offsets start on rings around the reference point, one direction per head
        (the k-th point k steps out), uniform attention weights, Xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [M, 2]
        # Scale each direction so its larger coordinate is 1 (points on the square ring).
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)  # [M, L, P, 2]
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: [N, Lq, C] (position embedding already added).
            reference_points: [N, Lq, L, 2] (x, y) in [0, 1] of each level's padded map, or
                [N, Lq, L, 4] boxes (cx, cy, w, h): offsets are then relative to the box size.
            input_flatten: [N, S, C], the L levels flattened and concatenated.
            spatial_shapes: int64 [L, 2] (H_l, W_l); level_start_index: int64 [L].
            input_padding_mask: [N, S] True = padding (its values are zeroed), or None.

        Returns:
            [N, Lq, C].
        """
        n, len_q, _ = query.shape
        len_in = input_flatten.shape[1]
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # An ONNX export of the in-place form disagrees with eager (test_export).
            fill = torch.Tensor.masked_fill if _exporting() else inplace.masked_fill
            value = fill(value, input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, m, self.d_model // m)  # [N, S, M, D]
        # Locations and weights stay in float32 under autocast: a half/bfloat16 location in [0, 1]
        # would be off by up to a pixel on a 100-pixel map.
        dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
        reference_points = reference_points.to(dtype)
        offsets = self.sampling_offsets(query).view(n, len_q, m, lv, p, 2).to(dtype)
        logits = self.attention_weights(query).view(n, len_q, m, lv * p).to(dtype)
        weights = F.softmax(logits, -1).view(n, len_q, m, lv, p)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l). Reference points [N, Lq, 1, L*P*2]
            # and sizes [L*P*2] are laid out as whole rows first, so that the only broadcast is over the
            # heads, an outer dimension; broadcasting them over P (and the sizes over x, y) in the innermost
            # dimensions made this pass 5x slower.
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            point_values = lv * p * 2
            base = reference_points[:, :, :, None, :].expand(n, len_q, lv, p, 2).reshape(n, len_q, 1, point_values)
            divisor = normalizer[:, None, :].expand(lv, p, 2).reshape(point_values)
            locations = _add_divided(base, offsets.view(n, len_q, m, point_values), divisor)
            locations = locations.view(n, len_q, m, lv, p, 2)
        elif reference_points.shape[-1] == 4:
            # Offsets are fractions of half the box size, spread over the P points.
            centre = reference_points[:, :, None, :, None, :2]
            size = reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / p * size * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)  # [N, Lq, C]
        return self.output_proj(out)


def _add_divided(base: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``base + numerator / denominator`` (broadcast) in one pass over the result (``addcdiv``) instead of
    a division and an addition over [N, Lq, M, L, P, 2]; the same result bit for bit. ONNX has no
    addcdiv, so an export records the two operations."""
    if _exporting():
        return base + numerator / denominator
    return torch.addcdiv(base, numerator, denominator)


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
