"""Trainer events. Tracking (MLflow), search (Ray Tune reports) and progress hook in here, so the
trainer itself knows nothing of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detr.engine.checkpoint import TrainingState
    from detr.engine.trainer import Trainer


class Callback:
    """No-op base; override the events you need. Called on every rank: check ``trainer.is_main``."""

    def on_train_start(self, trainer: Trainer, state: TrainingState) -> None:
        pass

    def on_step_end(self, trainer: Trainer, state: TrainingState, losses: dict[str, float]) -> None:
        """After each optimizer step; ``losses`` holds the weighted total, each loss term and ``lr``."""

    def on_epoch_end(self, trainer: Trainer, state: TrainingState, metrics: dict[str, float]) -> None:
        """After the epoch's evaluation (``metrics`` is empty on epochs without evaluation)."""

    def on_checkpoint(self, trainer: Trainer, state: TrainingState, path: Path, kind: str) -> None:
        """``kind`` is "step", "epoch", "best" or "interrupt"."""

    def on_train_end(self, trainer: Trainer, state: TrainingState, status: str) -> None:
        """``status`` is "finished", "interrupted" or "failed"."""
