"""Just-in-time build of the native deformable-attention kernels into a versioned cache.

Two shared libraries are built from ``detr/ops/csrc``:

* ``cpu``: ``ms_deform_attn_cpu.cpp``; defines the ``detr_ops`` operators and their CPU kernels. Built
  wherever a C++ compiler and ninja exist (first use, or ``detr ops build``).
* ``cuda``: ``ms_deform_attn_cuda.cu``; the CUDA kernels of the same operators. Built when a CUDA
  toolkit (nvcc) is found, for the architectures in ``TORCH_CUDA_ARCH_LIST`` (default
  ``8.0;8.6;9.0``); no GPU is needed to build.

Cache layout: ``<root>/<kind>-torch<version>-py<XY>-<hash>/`` with root ``$DETR_OPS_CACHE``, else
``$XDG_CACHE_HOME/mlflow-detr/ops``, else ``~/.cache/mlflow-detr/ops``. The hash covers the sources,
the torch/CUDA/Python versions, the compiler, the flags and the CUDA architectures, so a stale library
is never loaded; a directory holds a finished build once its ``BUILD_OK`` file exists.

Builds run in a child process (``python -m detr.ops.build_worker <kind> <directory>``) while holding an
exclusive ``fcntl`` lock on ``<directory>.lock``: concurrent processes build once and the others wait;
a killed build releases the lock and leaves no ``BUILD_OK``, so the next process starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from detr.errors import DetrError

CSRC = Path(__file__).resolve().parent / "csrc"
KINDS = ("cpu", "cuda")
SOURCES = {"cpu": ("ms_deform_attn_cpu.cpp",), "cuda": ("ms_deform_attn_cuda.cu",)}
HEADERS = ("ms_deform_attn_sampling.h", "ms_deform_attn_checks.h", "ms_deform_attn_cpu_kernels.h")
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;9.0"
CACHE_ENV = "DETR_OPS_CACHE"
# No -march: the cache may be shared by hosts with different CPUs. -O3 lets the compiler vectorize the
# channel loops (marked `omp simd`); -fopenmp makes at::parallel_for use torch's OpenMP thread pool.
# -fno-trapping-math (clang's default) lets GCC evaluate both arms of a floating-point select, which
# the loop over sampling points needs to be vectorized; it changes no result (no reassociation).
CXX_FLAGS = ("-O3", "-DNDEBUG", "-fopenmp", "-fno-trapping-math")
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3", "-DNDEBUG")
BUILD_OK = "BUILD_OK"
LOG_TAIL_LINES = 25


class OpsBuildError(DetrError):
    """A native kernel could not be built (missing tool, compiler error)."""


@dataclass(frozen=True)
class BuildTarget:
    """Where one kind of native library is (or will be) built."""

    kind: str
    name: str  # extension name, also the library's file stem
    directory: Path
    arch_list: str | None  # CUDA architectures (cuda kind only)

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"

    @property
    def log(self) -> Path:
        return self.directory / "build.log"

    @property
    def is_built(self) -> bool:
        return (self.directory / BUILD_OK).is_file() and self.library.is_file()


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mlflow-detr" / "ops"


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def find_cxx() -> str | None:
    """The C++ compiler torch's extension builder will call (``$CXX``, default ``c++``)."""
    return shutil.which(os.environ.get("CXX", "c++"))


def find_ninja() -> str | None:
    # pip's ninja lands next to the interpreter, which need not be on PATH (venv not activated).
    return shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or two levels above nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").is_file():
            return Path(os.environ[var])
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").is_file():
        return default
    nvcc = shutil.which("nvcc")
    # The parent of a wrapper script's directory has no include/: reject it rather than build against it.
    if nvcc and (Path(nvcc).resolve().parent.parent / "include" / "cuda_runtime.h").is_file():
        return Path(nvcc).resolve().parent.parent
    return None


def missing_prerequisite(kind: str) -> str | None:
    """Why ``kind`` cannot be built on this machine, or None when it can."""
    import torch

    if platform.system() == "Windows":
        return "the native build supports Linux and macOS only (it locks its cache with fcntl)"
    if find_cxx() is None:
        return f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}; install g++ or set CXX)"
    if find_ninja() is None:
        return "ninja not found (pip install ninja)"
    if kind == "cuda":
        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        if find_cuda_home() is None:
            return "CUDA toolkit not found (no nvcc under $CUDA_HOME, /usr/local/cuda or on PATH)"
    return None


def _source_files(kind: str) -> list[Path]:
    return [CSRC / name for name in (*SOURCES[kind], *HEADERS)]


def target(kind: str) -> BuildTarget:
    """The cache directory of ``kind`` for this torch, compiler, flags and source tree."""
    import torch

    if kind not in KINDS:
        raise OpsBuildError(f"unknown native kernel kind {kind!r}; choose one of {', '.join(KINDS)}")
    arch_list = cuda_arch_list() if kind == "cuda" else None
    digest = hashlib.sha256()
    for part in (kind, torch.__version__, str(torch.version.cuda), platform.python_version(), platform.machine(),
                 str(find_cxx()), " ".join(CXX_FLAGS + LD_FLAGS + NVCC_FLAGS), str(arch_list),
                 str(find_cuda_home()) if kind == "cuda" else ""):
        digest.update(part.encode() + b"\0")
    for path in _source_files(kind):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    python_tag = "".join(platform.python_version_tuple()[:2])
    label = re.sub(r"[^A-Za-z0-9._-]", "_", f"{kind}-torch{torch.__version__}-py{python_tag}")
    return BuildTarget(kind, f"detr_msda_{kind}", cache_root() / f"{label}-{digest.hexdigest()[:16]}", arch_list)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_built(kind: str, *, echo: bool = False) -> BuildTarget:
    """Build ``kind`` into the cache unless a finished build is there; safe across processes.

    ``echo`` streams the compiler output to stderr (the CLI); otherwise it goes to ``build.log`` only.
    Raises OpsBuildError with the reason when a prerequisite is missing or the build fails.
    """
    spec = target(kind)
    if spec.is_built:
        return spec
    reason = missing_prerequisite(kind)
    if reason is not None:
        raise OpsBuildError(f"cannot build the native {kind} kernel: {reason}")
    spec.directory.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(spec.directory.parent / f"{spec.directory.name}.lock"):
        if spec.is_built:  # another process finished it while we waited
            return spec
        _run_build(spec, echo=echo)
    return spec


def _run_build(spec: BuildTarget, *, echo: bool) -> None:
    # Holding the lock, anything in the directory is the remains of an interrupted build.
    shutil.rmtree(spec.directory, ignore_errors=True)
    spec.directory.mkdir(parents=True)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if spec.kind == "cuda":
        env["CUDA_HOME"] = str(find_cuda_home())
        env["TORCH_CUDA_ARCH_LIST"] = str(spec.arch_list)
    command = [sys.executable, "-m", "detr.ops.build_worker", spec.kind, str(spec.directory)]
    started = time.monotonic()
    with open(spec.log, "w") as log:
        if echo:
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in process.stdout or ():
                log.write(line)
                sys.stderr.write(line)
            returncode = process.wait()
        else:
            returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0 or not spec.library.is_file():
        tail = "\n".join(spec.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        raise OpsBuildError(
            f"building the native {spec.kind} kernel failed (exit status {returncode}); full log: {spec.log}\n{tail}"
        )
    import torch

    record = {"kind": spec.kind, "torch": torch.__version__, "cuda": torch.version.cuda, "arch_list": spec.arch_list,
              "seconds": round(time.monotonic() - started, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    temporary = spec.directory / f"{BUILD_OK}.tmp"
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, spec.directory / BUILD_OK)


def build_all(*, cuda: str = "auto") -> list[str]:
    """``detr ops build``: the CPU library, and the CUDA one per ``cuda`` (auto|yes|no).

    auto builds CUDA when a toolkit is found and a GPU is visible; yes whenever a toolkit is found
    (e.g. a GPU image built on a host without a GPU); no never. Returns one line per library.
    """
    import torch

    if cuda not in ("auto", "yes", "no"):
        raise OpsBuildError(f"cuda={cuda!r}: choose auto, yes or no")
    kinds = ["cpu"]
    skipped = None
    if cuda == "yes" or (cuda == "auto" and torch.cuda.is_available() and missing_prerequisite("cuda") is None):
        kinds.append("cuda")
    elif cuda == "auto":
        skipped = f"cuda: skipped ({missing_prerequisite('cuda') or 'no GPU visible; --cuda yes builds anyway'})"
    lines = []
    for kind in kinds:
        spec = target(kind)
        was_built = spec.is_built
        if not was_built:
            arch = f" for CUDA architectures {spec.arch_list}" if kind == "cuda" else ""
            print(f"{kind}: building into {spec.directory}{arch} ...", file=sys.stderr, flush=True)
            ensure_built(kind)
        lines.append(f"{kind}: {'already built' if was_built else 'built'}: {spec.library}")
    if skipped:
        lines.append(skipped)
    return lines
