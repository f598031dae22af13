"""Multi-scale deformable attention in plain PyTorch (grid_sample): the portable reference backend.

It is the ground truth the native kernels are tested against and the path used by ONNX export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear sampling of ``value`` at ``sampling_locations``, weighted and summed over levels/points.

    Args:
        value: [N, S, M, D], S = sum of H_l * W_l over levels, M heads of D channels.
        spatial_shapes: int64 [L, 2] (H_l, W_l) per level.
        level_start_index: int64 [L], offset of each level in S (unused here; kept for one signature).
        sampling_locations: [N, Lq, M, L, P, 2] (x, y) normalized to [0, 1] per level.
        attention_weights: [N, Lq, M, L, P], already softmax-normalized over L * P.

    Returns:
        [N, Lq, M * D].

    Sampling convention (align_corners=False, zero padding): pixel = loc * size - 0.5.
    """
    del level_start_index
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1].
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value_per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # -> [N*M, D, Lq, P]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    # [N*M, D, Lq, L*P] * weights -> sum -> [N*M, D, Lq] -> [N, M*D, Lq]
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()
