"""torch.library integration: opcheck, autograd registration, torch.compile."""

from __future__ import annotations

import torch

from detr.ops import ms_deform_attn
from detr.ops.reference import ms_deform_attn_reference

from .msda_helpers import case_inputs


def _inputs(dtype=torch.float64, requires_grad=False):
    inputs = case_inputs([(4, 5), (2, 3), (1, 1)], batch=2, heads=2, channels=8, points=3, queries=4, dtype=dtype,
                         kinks=False)
    value, shapes, starts, loc, weights = inputs.as_tuple()
    if requires_grad:
        for t in (value, loc, weights):
            t.requires_grad_(True)
    return value, shapes, starts, loc, weights


def test_opcheck_forward(native_cpu):
    for requires_grad in (False, True):
        torch.library.opcheck(torch.ops.detr_ops.ms_deform_attn.default, _inputs(requires_grad=requires_grad))


def test_opcheck_forward_float32_and_mixed_precision(native_cpu):
    value, shapes, starts, loc, weights = _inputs(dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.detr_ops.ms_deform_attn.default, (value, shapes, starts, loc, weights))
    half_value = value.detach().to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.detr_ops.ms_deform_attn.default, (half_value, shapes, starts, loc, weights),
                          atol=1e-2, rtol=1e-2)


def test_opcheck_backward(native_cpu):
    args = _inputs()
    grad_output = torch.randn(2, 4, 16, dtype=torch.float64)
    torch.library.opcheck(torch.ops.detr_ops.ms_deform_attn_backward.default, (*args, grad_output))


def test_torch_compile_fullgraph_forward_and_backward(native_cpu):
    value, shapes, starts, loc, weights = _inputs(dtype=torch.float32, requires_grad=True)

    def layer(v, sampling_locations, attention_weights):
        # A bit of surrounding math, as in a model: the op must sit in one graph with it.
        out = ms_deform_attn(v * 2, shapes, starts, sampling_locations.clamp(-1, 2), attention_weights)
        return out.relu().sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(value, loc, weights)
    want = layer(value, loc, weights)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), (value, loc, weights))
    want_grads = torch.autograd.grad(want.sum(), (value, loc, weights))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
    expected = ms_deform_attn_reference(value * 2, shapes, starts, loc.clamp(-1, 2), weights).relu().sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
