"""Backend choice for ``ms_deform_attn``: explicit, by request, device and library availability.

Rules, in order:

1. The requested backend is the ``backend=`` argument when it is "reference" or "native"; with
   "auto" (the default) it is ``$DETR_MSDA_BACKEND`` (auto|reference|native, default auto).
2. "reference" always runs the PyTorch reference (grid_sample; any device, the ONNX export path).
3. "native" runs the native kernel of the inputs' device (CPU, or CUDA) and raises DetrError saying
   why when that kernel cannot be built or loaded here.
4. "auto" runs the native kernel when it is available for the device, else the reference, with one
   warning per device type and process that says why.

The choice is made before the call, never by catching an exception: an error raised inside a
backend reaches the caller unchanged. Under ``torch.compile`` the choice is evaluated once at trace
time (``assume_constant_result``); changing the environment variable later does not recompile.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from detr.errors import DetrError
from detr.ops import native
from detr.ops.reference import ms_deform_attn_reference
from detr.ops.validation import check_inputs

BACKENDS = ("auto", "reference", "native")
BACKEND_ENV = "DETR_MSDA_BACKEND"
NATIVE_KINDS = {"cpu": "cpu", "cuda": "cuda"}  # device type -> native library

_warned: set[str] = set()
_warn_lock = threading.Lock()


class NativeKernelFallbackWarning(UserWarning):
    """The native kernel is unavailable for a device and the slower reference runs instead."""


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: [N, S, M, D], S = sum over levels of H_l * W_l.
        spatial_shapes: int64 [L, 2] (H_l, W_l).
        level_start_index: int64 [L], running sum of H_l * W_l.
        sampling_locations: [N, Lq, M, L, P, 2] normalized (x, y); value's dtype, or float32 when value
            is float16/bfloat16 (autocast).
        attention_weights: [N, Lq, M, L, P], same dtype as sampling_locations.
        backend: "auto" | "reference" | "native" (see the module docstring).

    Returns:
        [N, Lq, M * D] in value's dtype.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if choose_backend(backend, value.device.type) == "native":
        return _native(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _native(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> torch.Tensor:
    return torch.ops.detr_ops.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights)


def _reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> torch.Tensor:
    if sampling_locations.dtype == value.dtype:
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)
    # float16/bfloat16 value with float32 locations: grid_sample needs one dtype; compute in float32.
    out = ms_deform_attn_reference(value.float(), spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights)
    return out.to(value.dtype)


def requested_backend(backend: str = "auto") -> tuple[str, str]:
    """(backend, where the request came from) after applying the environment variable."""
    if backend not in BACKENDS:
        raise DetrError(f"unknown deformable-attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, f"backend={backend!r}"
    from_env = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if from_env not in BACKENDS:
        raise DetrError(f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not a deformable-attention backend; "
                        f"choose one of {', '.join(BACKENDS)}")
    return from_env, f"{BACKEND_ENV}={from_env}" if BACKEND_ENV in os.environ else "default"


@torch.compiler.assume_constant_result
def choose_backend(backend: str, device_type: str) -> str:
    """Return "native" or "reference" for a call on ``device_type`` (builds/loads the native library once)."""
    requested, source = requested_backend(backend)
    if requested == "reference":
        return "reference"
    kind = NATIVE_KINDS.get(device_type)
    if kind is None:
        reason = f"there is no native kernel for {device_type} tensors (only cpu and cuda)"
    else:
        state = native.status(kind)
        if state.available:
            return "native"
        reason = state.detail
    if requested == "native":
        raise DetrError(f"the native deformable-attention kernel was requested ({source}) but is unavailable for "
                        f"{device_type} tensors: {reason}")
    _warn_once(device_type, reason)
    return "reference"


def _warn_once(device_type: str, reason: str) -> None:
    with _warn_lock:
        if device_type in _warned:
            return
        _warned.add(device_type)
    warnings.warn(
        f"native deformable attention is unavailable for {device_type} tensors ({reason}); using the PyTorch "
        "reference, which is several times slower and uses more memory. `detr ops info` shows the details.",
        NativeKernelFallbackWarning,
        stacklevel=3,
    )


def backend_report() -> str:
    """Which backends are available here and, for each missing one, why (``detr ops info``)."""
    from detr.ops import build

    try:
        requested, source = requested_backend("auto")
        request = f"{requested} ({source})"
    except DetrError as error:
        request = f"invalid: {error}"
    lines = [f"deformable attention backends (requested: {request})",
             "  reference    available: PyTorch grid_sample, any device"]
    for kind in ("cpu", "cuda"):
        state = native.describe(kind)
        verdict = "available" if state.available else "unavailable"
        lines.append(f"  native-{kind:<5} {verdict}: {state.detail}")
    lines.append(f"  cache        {build.cache_root()} (${build.CACHE_ENV}); CUDA architectures "
                 f"{build.cuda_arch_list()} ($TORCH_CUDA_ARCH_LIST)")
    return "\n".join(lines)
