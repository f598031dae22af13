"""Trainer events. Tracking (MLflow), search (Ray Tune reports) and progress hook in here, so the
trainer itself knows nothing of them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from detr.engine.state import TrainingState
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


class EpochSummary(Callback):
    """One line per epoch on the main rank (training time, mean loss, headline metrics), printed
    through tqdm so that it does not break the progress bar: a long run can be read as it goes."""

    HEADLINE = ("coco/AP", "coco/AP50", "voc/mAP50")

    def __init__(self) -> None:
        self._losses: list[float] = []
        self._started = 0.0

    def on_train_start(self, trainer: Trainer, state: TrainingState) -> None:
        self._started = time.perf_counter()
        self._losses = []

    def on_step_end(self, trainer: Trainer, state: TrainingState, losses: dict[str, float]) -> None:
        self._losses.append(losses["loss"])

    def on_epoch_end(self, trainer: Trainer, state: TrainingState, metrics: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        elapsed = time.perf_counter() - self._started
        parts = [f"epoch {state.epoch}/{trainer.settings.epochs}", f"step {state.step}",
                 f"{int(elapsed // 60)}m{int(elapsed % 60):02d}s"]
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.3f}")
        parts += [f"{key} {metrics[key]:.3f}" for key in self.HEADLINE if key in metrics]
        tqdm.write("  ".join(parts))
        self._losses = []
