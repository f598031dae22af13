"""Child process of ``detr.ops.build``: compile, link and load-test one native library.

    python -m detr.ops.build_worker {cpu|cuda} DIRECTORY

Kept out of ``detr.ops``' imports so that ``-m`` runs a module nobody imported before.
"""

from __future__ import annotations

import sys
from pathlib import Path

from detr.ops.build import (CSRC, CXX_FLAGS, KINDS, LD_FLAGS, NVCC_FLAGS, SOURCES, BuildTarget,
                            OpsBuildError)


def _compile_in_this_process(kind: str, directory: Path) -> None:
    """The child process: compile, link and load-test one library with torch's extension builder."""
    from torch.utils import cpp_extension

    spec = BuildTarget(kind, f"detr_msda_{kind}", directory, None)
    cpp_extension.load(
        name=spec.name,
        sources=[str(CSRC / name) for name in SOURCES[kind]],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        extra_ldflags=list(LD_FLAGS) if kind == "cpu" else [],
        extra_include_paths=[str(CSRC)],
        build_directory=str(directory),
        with_cuda=kind == "cuda",
        is_python_module=False,
        verbose=True,
    )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in KINDS:
        raise OpsBuildError(f"usage: python -m detr.ops.build_worker {{{'|'.join(KINDS)}}} DIRECTORY")
    _compile_in_this_process(sys.argv[1], Path(sys.argv[2]))
