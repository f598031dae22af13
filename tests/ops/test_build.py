"""Building and caching the native libraries; behaviour without a compiler; CUDA compile check."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from detr.ops import build

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def test_cache_directory_is_keyed_and_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    cpu = build.target("cpu")
    assert cpu.directory.parent == tmp_path / "cache"
    assert cpu.directory.name.startswith(f"cpu-torch{torch.__version__.replace('+', '_')}-py")
    assert build.target("cpu") == cpu  # stable
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    cuda_80 = build.target("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    cuda_90 = build.target("cuda")
    assert cuda_80.directory != cuda_90.directory and cuda_90.arch_list == "9.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert build.target("cuda").arch_list == build.DEFAULT_CUDA_ARCH_LIST == "8.0;8.6;9.0"
    monkeypatch.delenv(build.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "mlflow-detr" / "ops"
    assert not cpu.is_built


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler found" in build.missing_prerequisite("cpu")
    with pytest.raises(build.OpsBuildError, match="no C\\+\\+ compiler found"):
        build.ensure_built("cpu")


def test_without_a_compiler_the_reference_runs_with_one_warning(tmp_path):
    # Fresh cache and no compiler: nothing can be built, so auto falls back (once warned) and native refuses.
    done = _python("""
        import warnings
        import torch
        from detr.errors import DetrError
        from detr.ops import ms_deform_attn
        from detr.ops.dispatch import NativeKernelFallbackWarning, backend_report
        from detr.ops.inputs import make_inputs
        from detr.ops.reference import ms_deform_attn_reference
        args = make_inputs([(4, 4), (2, 2)], batch=1, heads=2, channels=8, points=2, queries=3).as_tuple()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = [ms_deform_attn(*args) for _ in range(3)]
        fallback = [str(w.message) for w in caught if w.category is NativeKernelFallbackWarning]
        print("WARNINGS", len(fallback), fallback[0])
        print("EQUAL", all(torch.equal(o, ms_deform_attn_reference(*args)) for o in out))
        try:
            ms_deform_attn(*args, backend="native")
        except DetrError as error:
            print("NATIVE", error)
        print(backend_report())
    """, {build.CACHE_ENV: str(tmp_path), "CXX": "/nonexistent/c++"})
    assert done.returncode == 0, done.stderr
    assert "WARNINGS 1 native deformable attention is unavailable for cpu tensors (no C++ compiler found" in done.stdout
    assert "EQUAL True" in done.stdout
    assert "NATIVE the native deformable-attention kernel was requested (backend='native')" in done.stdout
    assert "native-cpu   unavailable: no C++ compiler found" in done.stdout
    assert not any(tmp_path.iterdir())  # nothing half-built left behind


@pytest.mark.slow
def test_concurrent_processes_build_once_and_all_load(tmp_path):
    if build.missing_prerequisite("cpu"):
        pytest.skip(f"cannot build here: {build.missing_prerequisite('cpu')}")
    code = """
        import torch
        from detr.ops import ms_deform_attn
        from detr.ops.inputs import make_inputs
        args = make_inputs([(4, 4), (2, 2)], batch=1, heads=2, channels=8, points=2, queries=3).as_tuple()
        print("SUM", float(ms_deform_attn(*args, backend="native").sum()))
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), **{build.CACHE_ENV: str(tmp_path)})
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=900) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    sums = {line for out, _ in outputs for line in out.splitlines() if line.startswith("SUM")}
    assert len(sums) == 1
    built = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(built) == 1 and (built[0] / build.BUILD_OK).is_file()


def _cuobjdump() -> str | None:
    cuda_home = build.find_cuda_home()
    candidates = [shutil.which("cuobjdump"), str(cuda_home / "bin" / "cuobjdump") if cuda_home else None]
    try:  # triton ships one
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path, monkeypatch):
    """CI's compile-only check of the CUDA translation unit (no GPU needed; several minutes)."""
    reason = build.missing_prerequisite("cuda")
    if reason is not None:
        pytest.skip(f"CUDA sources not compiled: {reason}")
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    spec = build.ensure_built("cuda")
    assert spec.is_built and spec.library.stat().st_size > 0
    compiler_warnings = re.findall(r".*(?:warning #\d+|warning:).*", spec.log.read_text())
    assert not compiler_warnings, compiler_warnings
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("compiled; cuobjdump not found, so the SASS architectures were not checked")
    listing = subprocess.run([tool, "--list-elf", str(spec.library)], capture_output=True, text=True, check=True)
    assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph(native_cpu):
    from detr.ops import ms_deform_attn
    from detr.ops.inputs import make_inputs

    value, shapes, starts, loc, weights = make_inputs([(4, 4), (2, 2)], batch=1, heads=2, channels=8, points=2,
                                                      queries=3).as_tuple()
    value.requires_grad_()

    def layer(v, sampling_locations, attention_weights):
        return ms_deform_attn(v, shapes, starts, sampling_locations, attention_weights).sigmoid()

    got = torch.compile(layer, fullgraph=True)(value, loc, weights)
    want = layer(value, loc, weights)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), value)[0], torch.autograd.grad(want.sum(), value)[0])
