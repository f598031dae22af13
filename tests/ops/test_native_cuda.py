"""Native CUDA kernel against the reference; skipped without a GPU (no unguarded .cuda())."""

from __future__ import annotations

import pytest
import torch

from detr.ops import ms_deform_attn
from detr.ops.reference import ms_deform_attn_reference

from .msda_helpers import case_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

CASES = [
    ([(1, 1)], 1, 1, 30, 1, 5),
    ([(8, 8), (4, 4), (2, 2), (1, 1)], 2, 8, 32, 4, None),
    ([(5, 7), (3, 4), (2, 2), (1, 1), (1, 2)], 3, 3, 64, 5, 11),
    ([(7, 9), (4, 5)], 1, 2, 71, 8, 13),
    ([(6, 5), (3, 3)], 1, 1, 1025, 2, 3),
    ([(2, 2), (1, 1)], 0, 2, 32, 8, 4),
]


def _on_cuda(inputs, dtype=None, coord_dtype=None):
    value, shapes, starts, loc, weights = inputs.as_tuple()
    dtype = dtype or value.dtype
    coord_dtype = coord_dtype or dtype
    return (value.to("cuda", dtype), shapes.to("cuda"), starts.to("cuda"), loc.to("cuda", coord_dtype),
            weights.to("cuda", coord_dtype))


@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_reference_float64(native_cuda, case):
    levels, batch, heads, channels, points, queries = case
    inputs = case_inputs(levels, batch=batch, heads=heads, channels=channels, points=points, queries=queries)
    value, shapes, starts, loc, weights = (t.requires_grad_(t.is_floating_point()) for t in _on_cuda(inputs))
    out = ms_deform_attn(value, shapes, starts, loc, weights, backend="native")
    cpu_leaves = [t.detach().cpu().requires_grad_() for t in (value, loc, weights)]
    expected = ms_deform_attn_reference(cpu_leaves[0], shapes.cpu(), starts.cpu(), cpu_leaves[1], cpu_leaves[2])
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-12)
    if out.numel() == 0:
        return
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, loc, weights), grad_out.cuda())
    expected_grads = torch.autograd.grad(expected, cpu_leaves, grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels", [30, 32, 64, 71, 1025])
def test_cuda_gradcheck_float64(native_cuda, channels):
    inputs = case_inputs([(3, 4), (2, 2)], batch=1, heads=2, channels=channels, points=2, queries=2, kinks=False)
    value, shapes, starts, loc, weights = _on_cuda(inputs)

    def op(v, sampling_locations, attention_weights):
        return ms_deform_attn(v, shapes, starts, sampling_locations, attention_weights, backend="native")

    assert torch.autograd.gradcheck(op, (value.requires_grad_(), loc.requires_grad_(), weights.requires_grad_()),
                                    eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=channels > 100)


@pytest.mark.parametrize("dtype,coords,tolerance", [
    (torch.float32, None, 1e-5), (torch.float16, None, 3e-3), (torch.bfloat16, None, 2e-2),
    (torch.float16, torch.float32, 3e-3), (torch.bfloat16, torch.float32, 2e-2),
])
def test_cuda_reduced_precision_against_float64(native_cuda, dtype, coords, tolerance):
    inputs = case_inputs([(16, 16), (8, 8), (4, 4), (2, 2)], batch=2, heads=8, channels=32, points=4, kinks=False)
    value, shapes, starts, loc, weights = (t.requires_grad_(t.is_floating_point())
                                           for t in _on_cuda(inputs, dtype, coords))
    out = ms_deform_attn(value, shapes, starts, loc, weights, backend="native")
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, loc, weights), grad_out.to("cuda", dtype))
    rounded = [t.detach().cpu().double().requires_grad_() for t in (value, loc, weights)]
    truth = ms_deform_attn_reference(rounded[0], shapes.cpu(), starts.cpu(), rounded[1], rounded[2])
    truth_grads = torch.autograd.grad(truth, rounded, grad_out)
    for got, want in zip((out, *grads), (truth, *truth_grads)):
        assert (got.cpu().double() - want).abs().max().item() <= tolerance * max(1.0, want.abs().max().item())


def test_cuda_and_cpu_kernels_agree(native_cuda, native_cpu):
    inputs = case_inputs([(20, 30), (10, 15), (5, 8), (3, 4)], batch=3, heads=8, channels=32, points=4,
                         dtype=torch.float32, kinks=False)
    on_cpu = ms_deform_attn(*inputs.as_tuple(), backend="native")
    on_gpu = ms_deform_attn(*_on_cuda(inputs), backend="native")
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-5, atol=1e-5)
