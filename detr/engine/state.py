"""Where training stands, and the random-number states that make a resumed run continue exactly.

Both go into every training checkpoint as plain types (``detr.checkpoints.format``) so that
``torch.load(weights_only=True)`` reads them back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class TrainingState:
    """Where training stands; everything needed to continue exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    samples_in_epoch: int = 0  # samples of the current epoch already consumed (mid-epoch checkpoints)
    best_metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

# -- RNG states ------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and Python as weights_only-safe types."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state in rank order; ``[own state]`` without a process group.

    A collective: every rank calls it at the same point. The ranks' streams differ (each draws for
    its own images: random sizes, dropout over tensors of its own shapes), so a restarted rank must
    continue its own stream, not rank 0's.
    """
    own = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    return states


def restore_own_rng_state(checkpoint: dict[str, Any]) -> None:
    """Restore this rank's stream from a checkpoint: ``rng_ranks[rank]`` when it was written by as many
    ranks as run now, else ``rng`` (rank 0's; a resume on another number of ranks cannot be exact)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    per_rank = checkpoint.get("rng_ranks")
    restore_rng_state(per_rank[rank] if per_rank and len(per_rank) == world else checkpoint["rng"])
