"""Input builders shared by the deformable-attention op tests."""

from __future__ import annotations

import torch

from detr.ops.inputs import MsdaInputs, make_inputs


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def add_special_points(inputs: MsdaInputs, seed: int, kinks: bool = True) -> None:
    """Overwrite some sampling locations with edge cases, in place.

    Per level: exact map borders (0 and 1), points far outside, and (``kinks``) exact pixel centres
    and the last positions with an in-map neighbour (x * W - 0.5 = -1 and = W). Those are kinks of
    bilinear interpolation with zero padding, where only a one-sided derivative exists; they are
    placed only on levels whose H and W are powers of two, where loc * size - 0.5 is an exact integer
    in both implementations, so both take the same side.
    """
    loc = inputs.sampling_locations  # [N, Lq, M, L, P, 2]
    if loc.numel() == 0:
        return
    generator = torch.Generator().manual_seed(seed)
    n, lq, m, num_levels, p, _ = loc.shape
    for level, (height, width) in enumerate(inputs.spatial_shapes.tolist()):
        specials_x = [0.0, 1.0, -3.0, 4.5]
        specials_y = [0.0, 1.0, 2.0, -1.0]
        if kinks and is_power_of_two(height) and is_power_of_two(width):
            specials_x += [-0.5 / width, 1 + 0.5 / width] + [(j + 0.5) / width for j in range(min(width, 3))]
            specials_y += [-0.5 / height, 1 + 0.5 / height] + [(i + 0.5) / height for i in range(min(height, 3))]
        count = max(1, loc[:, :, :, level].numel() // 2 // 6)  # about a sixth of the level's points
        flat = loc[:, :, :, level].reshape(-1, 2)
        picks = torch.randint(0, flat.shape[0], (count,), generator=generator)
        xs = torch.tensor(specials_x, dtype=loc.dtype)[torch.randint(0, len(specials_x), (count,), generator=generator)]
        ys = torch.tensor(specials_y, dtype=loc.dtype)[torch.randint(0, len(specials_y), (count,), generator=generator)]
        keep_x = torch.rand(count, generator=generator) < 0.5  # sometimes only one coordinate is special
        flat[picks, 0] = torch.where(keep_x, flat[picks, 0], xs)
        flat[picks, 1] = ys
        loc[:, :, :, level] = flat.view(n, lq, m, p, 2)


def case_inputs(levels, *, batch, heads, channels, points, queries=None, dtype=torch.float64, seed=0,
                kinks=True) -> MsdaInputs:
    inputs = make_inputs(levels, batch=batch, heads=heads, channels=channels, points=points, queries=queries,
                         dtype=dtype, seed=seed, offset_pixels=1.5)
    add_special_points(inputs, seed, kinks=kinks)
    return inputs
