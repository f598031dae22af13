"""The checkpoint file format: one file per checkpoint, written atomically, loaded with ``weights_only=True``.

Contents (DESIGN.md "Checkpoint"): model, optimizer, scheduler, grad scaler, EMA, epoch, step, RNG
states, sampler state, resolved config (JSON-able dict), label map, metrics, format version. Only
tensors, numbers, strings, lists and dicts go in, so ``torch.load(weights_only=True)`` can read it
and a checkpoint can never execute code on load.
"""

from __future__ import annotations

import os
import pickle
import signal
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from detr.errors import CheckpointError

FORMAT_VERSION = 1
KIND = "mlflow-detr-checkpoint"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus kind and format version) to ``path`` atomically: temp file + rename.

    A crash or SIGKILL during the write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"kind": KIND, "format_version": FORMAT_VERSION, **payload}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with interrupts_deferred():
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it (``KeyboardInterrupt``).

    A KeyboardInterrupt inside ``torch.save`` leaves its zip writer inconsistent and the next save
    in the same process fails; deferring it makes every checkpoint write complete. Only the main
    thread can install signal handlers; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        # Delivered again to whatever handled it before: Python's default raises KeyboardInterrupt
        # here; a process started with SIGINT ignored (nohup, a background job) keeps ignoring it.
        signal.raise_signal(signal.SIGINT)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; any other file is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable checkpoint (not a torch zip archive: truncated or another file type); "
            "expected a file written by `detr train` or `detr convert`"
        )
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: not a readable checkpoint: it holds pickled Python objects, which are refused for "
            "safety (weights_only loading); expected a file written by `detr train` or `detr convert`"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise CheckpointError(
            f"{path}: not an mlflow-detr checkpoint (no kind={KIND!r}); official DETR, Deformable-DETR and "
            "Hugging Face checkpoints are converted with `detr convert`"
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this package reads {FORMAT_VERSION}")
    return data


# -- the checkpoint directory ----------------------------------------------------------------


class CheckpointDirectory:
    """``step-XXXXXXXX.pt`` files (the newest ``keep_last`` kept) plus ``best.pt`` by a metric.

    ``best.pt`` is only replaced when ``metric`` improves, so it survives the keep-last pruning.
    """

    def __init__(self, directory: str | Path, *, keep_last: int, metric: str, mode: str) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.metric = metric
        self.mode = mode

    def step_path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def save(self, payload: dict[str, Any], step: int) -> Path:
        path = save_checkpoint(self.step_path(step), payload)
        for old in self.step_checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def is_better(self, value: float, best: float | None) -> bool:
        if value != value:  # NaN never improves
            return False
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best

    def save_best(self, payload: dict[str, Any]) -> Path:
        return save_checkpoint(self.best_path, payload)

    def step_checkpoints(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        return sorted(self.directory.glob("step-*.pt"))

    def latest(self) -> Path | None:
        found = self.step_checkpoints()
        return found[-1] if found else None
