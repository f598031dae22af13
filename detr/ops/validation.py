"""Input checks of ``ms_deform_attn`` with messages that say what was given and what is accepted.

Shape, dtype and device checks are free and always run. The level-table checks read
``spatial_shapes``/``level_start_index`` (a device-to-host copy of L*3 integers when they live on a
GPU); they run in eager mode and are skipped while ``torch.compile`` traces, where reading tensor
values would break the graph (the kernels keep their own bounds checks).
"""

from __future__ import annotations

import torch

from detr.errors import InvalidInputError

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


def _fail(message: str) -> None:
    raise InvalidInputError(f"ms_deform_attn: {message}")


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise InvalidInputError unless the five arguments describe one consistent call."""
    named = {"value": value, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
             "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")

    if value.dim() != 4:
        _fail(f"value must be [N, S, M, D] (batch, positions of all levels, heads, channels per head), "
              f"got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        _fail(f"sampling_locations must be [N, Lq, M, L, P, 2] normalized (x, y), got shape "
              f"{tuple(sampling_locations.shape)}")
    if attention_weights.dim() != 5:
        _fail(f"attention_weights must be [N, Lq, M, L, P], got shape {tuple(attention_weights.shape)}")
    n, s, m, _ = value.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        _fail(f"sampling_locations {tuple(sampling_locations.shape)} must have N = {n} and M = {m} like value "
              f"{tuple(value.shape)}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        _fail(f"attention_weights {tuple(attention_weights.shape)} must be sampling_locations' shape without the "
              f"last dimension, {tuple(sampling_locations.shape[:-1])}")
    num_levels = sampling_locations.shape[3]
    if spatial_shapes.shape != (num_levels, 2):
        _fail(f"spatial_shapes must be [L, 2] = [{num_levels}, 2] (H, W per level), got shape "
              f"{tuple(spatial_shapes.shape)}")
    if level_start_index.shape != (num_levels,):
        _fail(f"level_start_index must be [L] = [{num_levels}], got shape {tuple(level_start_index.shape)}")

    for name in ("spatial_shapes", "level_start_index"):
        if named[name].dtype != torch.int64:
            _fail(f"{name} must be int64, got {named[name].dtype}")
    if value.dtype not in FLOAT_DTYPES:
        _fail(f"value dtype {value.dtype} is not supported; use float64, float32, float16 or bfloat16")
    if attention_weights.dtype != sampling_locations.dtype:
        _fail(f"sampling_locations ({sampling_locations.dtype}) and attention_weights ({attention_weights.dtype}) "
              "must share a dtype")
    coord = sampling_locations.dtype
    if coord != value.dtype and not (value.dtype in REDUCED_DTYPES and coord == torch.float32):
        _fail(f"sampling_locations/attention_weights are {coord} but value is {value.dtype}: use value's dtype, "
              "or float32 when value is float16/bfloat16")
    for name, tensor in named.items():
        if tensor.device != value.device:
            _fail(f"{name} is on {tensor.device} but value is on {value.device}; put all inputs on one device")

    if not torch.compiler.is_compiling():
        _check_levels(spatial_shapes, level_start_index, s)


def _check_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, num_positions: int) -> None:
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    expected = 0
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        if height <= 0 or width <= 0:
            _fail(f"spatial_shapes[{level}] = ({height}, {width}): heights and widths must be positive")
        if start != expected:
            _fail(f"level_start_index[{level}] = {start} but the levels before it hold {expected} positions "
                  f"(level_start_index must be the running sum of H*W: {_running_sum(shapes)})")
        expected += height * width
    if expected != num_positions:
        _fail(f"value has S = {num_positions} positions but spatial_shapes {shapes} sum to {expected} (S must be "
              "the sum of H*W over levels)")


def _running_sum(shapes: list[list[int]]) -> list[int]:
    starts, total = [], 0
    for height, width in shapes:
        starts.append(total)
        total += height * width
    return starts
