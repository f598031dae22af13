"""Whether the native kernels can run in this process; builds (once, cached) and loads them on demand.

Nothing here runs at import. ``status(kind)`` is the one entry point of the dispatcher: the first call
per kind and process builds the library if the cache lacks it, loads it with
``torch.ops.load_library`` and registers the Python side; the answer is remembered for the process.
``describe(kind)`` answers without building anything (``detr ops info``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from detr.ops import build
from detr.ops.registration import ensure_registered

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeStatus:
    available: bool
    detail: str  # where the library was loaded from, or why it is unavailable


_lock = threading.RLock()
_status: dict[str, NativeStatus] = {}


def status(kind: str) -> NativeStatus:
    """Build (if needed) and load the ``kind`` library ("cpu" or "cuda"); remembered per process."""
    with _lock:
        if kind not in _status:
            _status[kind] = _load(kind)
        return _status[kind]


def loaded(kind: str) -> bool:
    """True when ``kind`` is already loaded in this process (never builds)."""
    with _lock:
        return kind in _status and _status[kind].available


def _load(kind: str) -> NativeStatus:
    if kind == "cuda":
        cpu = status("cpu")  # defines the operators the CUDA library adds kernels to
        if not cpu.available:
            return NativeStatus(False, f"needs the native CPU library, which is unavailable: {cpu.detail}")
    spec = build.target(kind)
    if not spec.is_built:
        reason = build.missing_prerequisite(kind)
        if reason is not None:
            return NativeStatus(False, reason)
        log.warning("building the native %s deformable-attention kernel into %s (once; about %s)",
                    kind, spec.directory, "1 minute" if kind == "cpu" else "5-10 minutes")
        try:
            spec = build.ensure_built(kind)
        except build.OpsBuildError as error:
            return NativeStatus(False, str(error))
    torch.ops.load_library(str(spec.library))
    ensure_registered()
    return NativeStatus(True, f"loaded from {spec.library}")


def describe(kind: str) -> NativeStatus:
    """Availability of ``kind`` as far as it can be told without building or loading anything."""
    with _lock:
        if kind in _status:
            return _status[kind]
    if kind == "cuda" and not torch.cuda.is_available():
        built = build.target("cuda").is_built
        reason = build.missing_prerequisite("cuda")
        can_build = "built" if built else ("cannot be built here: " + reason if reason else "can be built here")
        return NativeStatus(False, f"no CUDA device visible (torch.cuda.is_available() is False); kernel {can_build}")
    spec = build.target(kind)
    if spec.is_built:
        return NativeStatus(True, f"built in {spec.directory}")
    reason = build.missing_prerequisite(kind)
    if reason is not None:
        return NativeStatus(False, reason)
    return NativeStatus(True, f"not built yet: builds on first use, or run `detr ops build` (cache {spec.directory})")
