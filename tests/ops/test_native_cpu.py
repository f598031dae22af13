"""Native CPU kernel against the PyTorch reference (float64), gradcheck, dtypes, threads."""

from __future__ import annotations

import pytest
import torch

from detr.ops import ms_deform_attn
from detr.ops.reference import ms_deform_attn_reference

from .msda_helpers import case_inputs

# (levels, batch, heads, channels, points, queries); queries=None is encoder-like (Lq = S).
# Together: levels of different sizes incl. 1x1, D in {30, 32, 64, 71}, P in 1..9, L in 1..5,
# batch in {0, 1, 3}.
CASES = [
    ([(1, 1)], 1, 1, 30, 1, 5),
    ([(4, 4), (2, 2), (1, 1)], 1, 2, 32, 2, None),
    ([(6, 5), (3, 3)], 3, 2, 71, 3, 7),
    ([(8, 8), (4, 4), (2, 2), (1, 1)], 1, 8, 32, 4, None),
    ([(5, 7), (3, 4), (2, 2), (1, 1), (1, 2)], 3, 3, 64, 5, 11),
    ([(16, 8)], 3, 4, 30, 6, 9),
    ([(7, 9), (4, 5), (2, 3)], 1, 2, 64, 7, 13),
    ([(2, 2), (1, 1)], 0, 2, 32, 8, 4),
    ([(3, 3), (2, 2), (1, 1), (4, 4)], 3, 1, 71, 8, 6),
    ([(8, 4), (4, 2), (2, 1), (1, 1), (16, 16)], 1, 2, 32, 4, 10),
    ([(12, 10), (6, 5)], 0, 3, 64, 2, None),
    # L * P = 45 > 32: the forward plans a row's points in chunks of 32 (a full one and a partial one).
    ([(6, 5), (3, 3), (2, 2), (1, 1), (4, 3)], 2, 2, 32, 9, 7),
]


def _ids(case) -> str:
    levels, batch, heads, channels, points, queries = case
    return f"L{len(levels)}-N{batch}-M{heads}-D{channels}-P{points}-Lq{queries or 'S'}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_forward_and_gradients_match_reference_float64(native_cpu, case):
    levels, batch, heads, channels, points, queries = case
    inputs = case_inputs(levels, batch=batch, heads=heads, channels=channels, points=points, queries=queries,
                         seed=len(levels) * 100 + channels)
    value, shapes, starts, loc, weights = inputs.as_tuple()
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (value, loc, weights)]

    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend="native")
    expected = ms_deform_attn_reference(ref_leaves[0], shapes, starts, ref_leaves[1], ref_leaves[2])
    assert out.shape == expected.shape == (batch, loc.shape[1], heads * channels)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    if out.numel() == 0:
        return
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad_out)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def test_points_outside_every_map_give_zero_output_and_gradients(native_cpu):
    inputs = case_inputs([(4, 4), (2, 3)], batch=1, heads=2, channels=32, points=2, queries=3, kinks=False)
    inputs.sampling_locations[..., 0] = -2.0  # one map-width left of every level
    value, shapes, starts, loc, weights = (t.requires_grad_(t.is_floating_point()) for t in inputs.as_tuple())
    out = ms_deform_attn(value, shapes, starts, loc, weights, backend="native")
    assert torch.count_nonzero(out) == 0
    grads = torch.autograd.grad(out, (value, loc, weights), torch.ones_like(out))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("channels", [32, 0])
def test_backward_writes_every_location_and_weight_gradient(native_cpu, channels):
    # The backward allocates these two gradients uninitialized (its kernel writes each point's, zeros for
    # points outside every map) and zeroes them only when the kernel does not run (D = 0). With
    # deterministic algorithms on, PyTorch fills uninitialized memory with NaN, so a skipped point shows.
    inputs = case_inputs([(5, 4), (3, 2)], batch=2, heads=2, channels=channels, points=3, queries=7, kinks=False)
    inputs.sampling_locations[0, :3] = -2.0  # some points outside every map
    value, shapes, starts, loc, weights = inputs.as_tuple()
    grad_out = torch.randn(2, 7, 2 * channels, dtype=torch.float64)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(3, dtype=torch.float64)).all()  # the fill is on
        _, grad_loc, grad_weights = torch.ops.detr_ops.ms_deform_attn_backward(value, shapes, starts, loc, weights,
                                                                             grad_out)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    expected = torch.autograd.grad(ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2]),
                                   leaves, grad_out, allow_unused=True)
    torch.testing.assert_close(grad_loc, expected[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_weights, expected[2], rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(grad_weights[0, :3]) == 0


@pytest.mark.parametrize("channels", [30, 32, 64, 71, 1025])
def test_gradcheck_float64(native_cpu, channels):
    # Small maps keep the numerical Jacobian (two forwards per input element) fast; D = 1025 uses
    # gradcheck's fast mode (random projections of the Jacobian) for the same reason.
    wide = channels > 100
    inputs = case_inputs([(2, 3), (1, 1)] if wide else [(3, 4), (2, 2)], batch=1, heads=1 if wide else 2,
                         channels=channels, points=2, queries=2, seed=channels, kinks=False)
    value, shapes, starts, loc, weights = inputs.as_tuple()

    def op(v, sampling_locations, attention_weights):
        return ms_deform_attn(v, shapes, starts, sampling_locations, attention_weights, backend="native")

    assert torch.autograd.gradcheck(op, (value.requires_grad_(), loc.requires_grad_(), weights.requires_grad_()),
                                    eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=wide)


ENCODER_A_SMALL = [(16, 16), (8, 8), (4, 4), (2, 2)]


def _float64_truth(inputs):
    value, shapes, starts, loc, weights = (t.double() if t.is_floating_point() else t for t in inputs.as_tuple())
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return out, grad_out, torch.autograd.grad(out, leaves, grad_out)


def test_float32_within_1e_5_of_float64(native_cpu):
    inputs = case_inputs(ENCODER_A_SMALL, batch=2, heads=8, channels=32, points=4, dtype=torch.float64, kinks=False)
    truth, grad_out, truth_grads = _float64_truth(inputs)
    value, shapes, starts, loc, weights = (t.float() if t.is_floating_point() else t for t in inputs.as_tuple())
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend="native")
    assert out.dtype == torch.float32
    assert (out.double() - truth).abs().max().item() <= 1e-5
    grads = torch.autograd.grad(out, leaves, grad_out.float())
    for got, want in zip(grads, truth_grads):
        # Gradients grow with the map size (d/dx carries a factor W): compare relative to their scale.
        assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("coords", ["same", "float32"])
def test_half_and_bfloat16_on_cpu(native_cpu, dtype, tolerance, coords):
    inputs = case_inputs(ENCODER_A_SMALL, batch=1, heads=4, channels=32, points=4, kinks=False)
    coord_dtype = dtype if coords == "same" else torch.float32
    value = inputs.value.to(dtype).requires_grad_()
    loc = inputs.sampling_locations.to(coord_dtype).requires_grad_()
    weights = inputs.attention_weights.to(coord_dtype).requires_grad_()
    out = ms_deform_attn(value, inputs.spatial_shapes, inputs.level_start_index, loc, weights, backend="native")
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, (value, loc, weights), grad_out.to(dtype))
    assert grads[0].dtype == dtype and grads[1].dtype == coord_dtype and grads[2].dtype == coord_dtype

    # Ground truth: float64 reference on the inputs as rounded to 16 bits, so that only the kernel's
    # own rounding (float32 accumulation, 16-bit outputs) is measured.
    rounded = [t.detach().double().requires_grad_() for t in (value, loc, weights)]
    truth = ms_deform_attn_reference(rounded[0], inputs.spatial_shapes, inputs.level_start_index, rounded[1],
                                     rounded[2])
    truth_grads = torch.autograd.grad(truth, rounded, grad_out)
    for got, want in zip((out, *grads), (truth, *truth_grads)):
        error = (got.double() - want).abs().max().item()
        assert error <= tolerance * want.abs().max().item(), error


def test_same_result_for_any_thread_count_and_noncontiguous_inputs(native_cpu):
    inputs = case_inputs([(9, 7), (5, 4), (3, 2)], batch=2, heads=4, channels=32, points=3, dtype=torch.float32)
    args = inputs.as_tuple()
    grad_out = torch.randn(2, args[3].shape[1], 128)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((torch.ops.detr_ops.ms_deform_attn(*args),
                            *torch.ops.detr_ops.ms_deform_attn_backward(*args, grad_out)))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)  # bitwise: no races, fixed summation order

    # A transposed copy of value viewed back to [N, S, M, D] is not contiguous.
    value_t = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    assert not value_t.is_contiguous()
    out = ms_deform_attn(value_t, *args[1:], backend="native")
    assert torch.equal(out, results[0][0])
