"""Backend choice for ``ms_deform_attn``. Until the native kernels land, every call uses the reference."""

from __future__ import annotations

import torch

from detr.ops.reference import ms_deform_attn_reference


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """See ``ms_deform_attn_reference`` for shapes; ``backend`` is auto|reference|native."""
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def backend_report() -> str:
    """Human-readable availability of each backend (grows with the native kernels)."""
    return "deformable attention backends:\n  reference  available (PyTorch grid_sample)"
