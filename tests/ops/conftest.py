"""Fixtures of the deformable-attention op tests: the native libraries, built and loaded once."""

from __future__ import annotations

import pytest
import torch

from detr.ops import build, native


@pytest.fixture(scope="session")
def native_cpu() -> None:
    """The native CPU library, built (or taken from the cache) and loaded; skipped without a compiler."""
    reason = build.missing_prerequisite("cpu")
    if reason is not None:
        pytest.skip(f"native CPU kernel cannot be built here: {reason}")
    state = native.status("cpu")
    assert state.available, f"native CPU kernel unavailable although it can be built: {state.detail}"


@pytest.fixture(scope="session")
def native_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    state = native.status("cuda")
    assert state.available, f"native CUDA kernel unavailable: {state.detail}"
