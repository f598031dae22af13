"""Realistic inputs of ``ms_deform_attn`` for tests and benchmarks.

Deformable DETR samples near a reference point: every pixel centre of every level for the encoder
(Lq = S), a box centre for each decoder query, plus learned offsets of a few pixels per level.
Uniformly random locations would give a different (much worse) cache behaviour than real use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MsdaInputs:
    value: torch.Tensor  # [N, S, M, D]
    spatial_shapes: torch.Tensor  # int64 [L, 2]
    level_start_index: torch.Tensor  # int64 [L]
    sampling_locations: torch.Tensor  # [N, Lq, M, L, P, 2]
    attention_weights: torch.Tensor  # [N, Lq, M, L, P], softmax over L * P

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.value, self.spatial_shapes, self.level_start_index, self.sampling_locations,
                self.attention_weights)


def level_tables(level_shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes [L, 2] and level_start_index [L] for a list of (H, W)."""
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64).reshape(-1, 2)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def encoder_reference_points(level_shapes: list[tuple[int, int]]) -> torch.Tensor:
    """[S, 2] normalized (x, y) pixel centres of every level, in the order of value's S axis."""
    points = []
    for height, width in level_shapes:
        y, x = torch.meshgrid((torch.arange(height, dtype=torch.float64) + 0.5) / height,
                              (torch.arange(width, dtype=torch.float64) + 0.5) / width, indexing="ij")
        points.append(torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1))
    return torch.cat(points)


def make_inputs(
    level_shapes: list[tuple[int, int]],
    *,
    batch: int,
    heads: int,
    channels: int,
    points: int,
    queries: int | None = None,
    offset_pixels: float = 2.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> MsdaInputs:
    """Inputs shaped like one Deformable-DETR attention call.

    ``queries=None`` is the encoder (one query per position, Lq = S, reference point = its pixel
    centre); an int gives decoder-like queries with random reference points. Offsets are Gaussian with
    ``offset_pixels`` standard deviation in each level's own pixels, so some points fall off the map.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tables(level_shapes)
    num_levels = len(level_shapes)
    num_positions = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if queries is None:
        reference = encoder_reference_points(level_shapes).expand(batch, -1, -1)  # [N, S, 2]
    else:
        reference = torch.rand(batch, queries, 2, generator=generator, dtype=torch.float64)
    num_queries = reference.shape[1]
    # [L, 2] (W, H): pixel offsets -> normalized offsets per level.
    level_size = spatial_shapes.flip(-1).to(torch.float64)
    offsets = torch.randn(batch, num_queries, heads, num_levels, points, 2, generator=generator, dtype=torch.float64)
    locations = reference[:, :, None, None, None, :] + offsets * offset_pixels / level_size[:, None, :]
    logits = torch.randn(batch, num_queries, heads, num_levels * points, generator=generator, dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, num_queries, heads, num_levels, points)
    value = torch.randn(batch, num_positions, heads, channels, generator=generator, dtype=torch.float64)
    return MsdaInputs(value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype))
