"""Python side of the ``detr_ops`` operators: fake (shape) kernels and the autograd formula.

The operators themselves are defined in C++ (``TORCH_LIBRARY(detr_ops)`` in csrc/ms_deform_attn_cpu.cpp,
which names this module as their Python home). ``ensure_registered`` runs once, right after the
library is loaded; it makes the op work with autograd, ``torch.compile`` and ``torch.library.opcheck``.
"""

from __future__ import annotations

import threading

import torch

FORWARD = "detr_ops::ms_deform_attn"
BACKWARD = "detr_ops::ms_deform_attn_backward"

_lock = threading.Lock()
_registered = False


def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    # [N, S, M, D], [N, Lq, M, L, P, 2] -> [N, Lq, M * D]
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _fake_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.detr_ops.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    # spatial_shapes and level_start_index are integer tables: no gradient.
    return grad_value, None, None, grad_locations, grad_weights


def ensure_registered() -> None:
    """Register the fake kernels and the autograd formula (idempotent; needs the library loaded)."""
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake(FORWARD)(_fake_forward)
        torch.library.register_fake(BACKWARD)(_fake_backward)
        torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)
        _registered = True
