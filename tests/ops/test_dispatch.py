"""Backend choice, error surfacing and input validation of detr.ops.ms_deform_attn."""

from __future__ import annotations

import warnings

import pytest
import torch

from detr.cli import main
from detr.errors import DetrError, InvalidInputError
from detr.ops import dispatch, ms_deform_attn, native
from detr.ops.reference import ms_deform_attn_reference

from .msda_helpers import case_inputs


@pytest.fixture
def small():
    return case_inputs([(4, 5), (2, 3)], batch=2, heads=2, channels=8, points=2, queries=3, kinks=False)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())


@pytest.fixture
def native_unavailable(monkeypatch, fresh_warnings):
    monkeypatch.setattr(native, "status", lambda kind: native.NativeStatus(False, "no C++ compiler found (test)"))


@pytest.mark.parametrize("env,backend,expected", [
    (None, "auto", "native"), ("auto", "auto", "native"), ("reference", "auto", "reference"),
    ("native", "auto", "native"), ("reference", "native", "native"), ("native", "reference", "reference"),
    (" Reference ", "auto", "reference"),
])
def test_argument_and_environment_choose_the_backend(native_cpu, monkeypatch, env, backend, expected):
    if env is None:
        monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.BACKEND_ENV, env)
    assert dispatch.choose_backend(backend, "cpu") == expected


def test_each_backend_is_really_called(native_cpu, monkeypatch, small):
    calls = []
    monkeypatch.setattr(dispatch, "_native", lambda *a: calls.append("native") or torch.zeros(()))
    monkeypatch.setattr(dispatch, "_reference", lambda *a: calls.append("reference") or torch.zeros(()))
    ms_deform_attn(*small.as_tuple())
    ms_deform_attn(*small.as_tuple(), backend="reference")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    ms_deform_attn(*small.as_tuple())
    assert calls == ["native", "reference", "reference"]


def test_invalid_backend_names_list_the_choices(monkeypatch, small):
    with pytest.raises(DetrError, match="'fast'.*auto, reference, native"):
        ms_deform_attn(*small.as_tuple(), backend="fast")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    with pytest.raises(DetrError, match="DETR_MSDA_BACKEND='cuda'.*auto, reference, native"):
        ms_deform_attn(*small.as_tuple())


def test_native_requested_but_unavailable_says_why(native_unavailable, monkeypatch, small):
    with pytest.raises(DetrError, match=r"backend='native'.*no C\+\+ compiler found \(test\)"):
        ms_deform_attn(*small.as_tuple(), backend="native")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "native")
    with pytest.raises(DetrError, match="DETR_MSDA_BACKEND=native.*no C\\+\\+ compiler"):
        ms_deform_attn(*small.as_tuple())


def test_auto_falls_back_to_reference_with_one_warning(native_unavailable, monkeypatch, small):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(*small.as_tuple())
        second = ms_deform_attn(*small.as_tuple())
    fallback = [w for w in caught if issubclass(w.category, dispatch.NativeKernelFallbackWarning)]
    assert len(fallback) == 1
    assert "no C++ compiler found (test)" in str(fallback[0].message)
    assert "reference" in str(fallback[0].message)
    torch.testing.assert_close(first, ms_deform_attn_reference(*small.as_tuple()))
    torch.testing.assert_close(second, first)


def test_devices_without_a_native_kernel_use_the_reference(fresh_warnings):
    with pytest.warns(dispatch.NativeKernelFallbackWarning, match="no native kernel for xla"):
        assert dispatch.choose_backend("auto", "xla") == "reference"
    with pytest.raises(DetrError, match="no native kernel for xla"):
        dispatch.choose_backend("native", "xla")


def test_errors_inside_a_backend_are_not_swallowed(native_cpu, monkeypatch, small, fresh_warnings):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(dispatch, "_native", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback would not warn either; it would return
        with pytest.raises(RuntimeError, match="kernel exploded"):
            ms_deform_attn(*small.as_tuple())


def test_kernel_checks_guard_direct_calls(native_cpu, small):
    # The numbers in these messages once crashed the process (streamed integers, torch 2.11 + g++ 13):
    # the whole message is checked, numbers included.
    value, shapes, starts, loc, weights = small.as_tuple()
    with pytest.raises(RuntimeError,
                       match=r"level_start_index\[0\] = 1 but the levels before it hold 0 positions"):
        torch.ops.detr_ops.ms_deform_attn(value, shapes, starts + 1, loc, weights)
    with pytest.raises(RuntimeError,
                       match=r"sampling_locations must be \[N, Lq, M, L, P, 2\], got shape \[2, 3, 2, 2, 2\]"):
        torch.ops.detr_ops.ms_deform_attn(value, shapes, starts, loc[..., 0], weights)
    with pytest.raises(RuntimeError, match=r"value must be float64, float32, float16 or bfloat16, got Int"):
        torch.ops.detr_ops.ms_deform_attn(value.int(), shapes, starts, loc, weights)
    grad = torch.zeros(2, 3, 15)
    with pytest.raises(RuntimeError,
                       match=r"grad_output must be \[N, Lq, M \* D\] = \[2, 3, 16\], got \[2, 3, 15\]"):
        torch.ops.detr_ops.ms_deform_attn_backward(value, shapes, starts, loc, weights, grad)


def _bad(small, **changes):
    args = dict(zip(("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"),
                    small.as_tuple()))
    args.update(changes)
    return args


@pytest.mark.parametrize("change,message", [
    (lambda s: {"value": s.value[0]}, r"value must be \[N, S, M, D\].*got shape \(26, 2, 8\)"),
    (lambda s: {"sampling_locations": s.sampling_locations[..., :1]}, r"sampling_locations must be .*2\]"),
    (lambda s: {"sampling_locations": s.sampling_locations[:1], "attention_weights": s.attention_weights[:1]},
     "must have N = 2 and M = 2"),
    (lambda s: {"attention_weights": s.attention_weights[..., :1]}, "attention_weights .* without the last"),
    (lambda s: {"spatial_shapes": s.spatial_shapes[:1]}, r"spatial_shapes must be \[L, 2\] = \[2, 2\]"),
    (lambda s: {"spatial_shapes": s.spatial_shapes.int()}, "spatial_shapes must be int64, got torch.int32"),
    (lambda s: {"level_start_index": torch.tensor([0, 19])}, r"level_start_index\[1\] = 19 .* hold 20 .*\[0, 20\]"),
    (lambda s: {"spatial_shapes": torch.tensor([[4, 5], [2, 2]])}, "S = 26 positions but spatial_shapes .* sum to 24"),
    (lambda s: {"spatial_shapes": torch.tensor([[4, 5], [0, 3]]), "level_start_index": torch.tensor([0, 20])},
     r"spatial_shapes\[1\] = \(0, 3\)"),
    (lambda s: {"value": s.value.int()}, "value dtype torch.int32 is not supported"),
    (lambda s: {"attention_weights": s.attention_weights.float()}, "must share a dtype"),
    (lambda s: {"sampling_locations": s.sampling_locations.float(), "attention_weights": s.attention_weights.float()},
     "are torch.float32 but value is torch.float64"),
    (lambda s: {"spatial_shapes": s.spatial_shapes.to("meta")}, "spatial_shapes is on meta but value is on cpu"),
    (lambda s: {"value": [1.0]}, "value must be a torch.Tensor, got list"),
])
def test_bad_inputs_raise_clear_errors(small, change, message):
    with pytest.raises(InvalidInputError, match=message):
        ms_deform_attn(**_bad(small, **change(small)), backend="reference")


def test_empty_batch_and_queries(native_cpu):
    for batch, queries in ((0, 4), (2, 0)):
        inputs = case_inputs([(3, 3)], batch=batch, heads=2, channels=4, points=2, queries=queries)
        for backend in ("native", "reference"):
            out = ms_deform_attn(*inputs.as_tuple(), backend=backend)
            assert out.shape == (batch, queries, 8)


def test_backend_report_and_cli(native_cpu, capsys, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    report = dispatch.backend_report()
    assert "requested: reference (DETR_MSDA_BACKEND=reference)" in report
    assert "reference    available" in report
    assert "native-cpu   available: loaded from" in report
    cuda_line = next(line for line in report.splitlines() if "native-cuda" in line)
    if not torch.cuda.is_available():
        assert "unavailable: no CUDA device visible" in cuda_line
    assert main(["ops", "info"]) == 0
    assert capsys.readouterr().out.strip() == report
    monkeypatch.setenv(dispatch.BACKEND_ENV, "bogus")
    assert "requested: invalid" in dispatch.backend_report()


def test_cli_ops_build_reports_the_cached_library(native_cpu, capsys):
    assert main(["ops", "build", "--cuda", "no"]) == 0
    out = capsys.readouterr().out
    assert "cpu: already built:" in out and "detr_msda_cpu.so" in out
