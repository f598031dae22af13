"""The training loop, separate from the model.

The trainer receives everything as explicit arguments (model, criterion, loaders, optimizer,
scheduler, evaluator, checkpoint directory, callbacks) and knows nothing of configs, MLflow or Ray:
those reach it through callbacks. One optimizer step = ``grad_accum_steps`` micro-batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from detr.checkpoints.format import CheckpointDirectory
from detr.engine.amp import resolve_amp
from detr.engine.callbacks import Callback
from detr.engine.evaluation import Evaluator
from detr.engine.sampler import ResumableSampler
from detr.engine.state import TrainingState, capture_rng_state, gather_rng_states, restore_own_rng_state
from detr.errors import DetrError


class NonFiniteLossError(DetrError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainerSettings:
    epochs: int
    grad_accum_steps: int = 1
    clip_max_norm: float = 0.0
    amp: str = "none"  # none | bf16 | fp16 | auto (resolved by the Trainer, detr/engine/amp.py)
    checkpoint_every_steps: int = 0
    eval_every_epochs: int = 1
    best_metric: str = "coco/AP"
    on_nonfinite_loss: str = "error"  # error | skip
    progress: bool = True


class Trainer:
    """Trains ``model`` with ``criterion``; checkpoints through ``checkpoints``; reports to callbacks.

    Args:
        model: forward(images [B,3,H,W], masks [B,H,W]) -> outputs dict (possibly DDP-wrapped).
        criterion: (outputs, targets) -> dict of loss terms; ``criterion.weight_dict`` gives weights.
        postprocess: (outputs, target_sizes [B,2]) -> list of prediction dicts for the evaluator.
        train_loader / val_loader: yield (images, masks, targets) batches; the train loader's
            sampler must be the given ``sampler`` so epochs and mid-epoch resumes are exact.
        extra_state: JSON-able entries stored in every checkpoint (resolved config, label map).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        criterion: nn.Module,
        postprocess: Callable,
        train_loader: Iterable,
        sampler: ResumableSampler,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        settings: TrainerSettings,
        device: torch.device,
        checkpoints: CheckpointDirectory | None,
        val_loader: Iterable | None = None,
        evaluator: Evaluator | None = None,
        ema: torch.optim.swa_utils.AveragedModel | None = None,
        callbacks: Sequence[Callback] = (),
        extra_state: dict[str, Any] | None = None,
        is_main: bool = True,
    ) -> None:
        self.model = model
        self.criterion = criterion
        self.postprocess = postprocess
        self.train_loader = train_loader
        self.sampler = sampler
        self.val_loader = val_loader
        self.evaluator = evaluator
        self.optimizer = optimizer
        self.scheduler = scheduler
        # train.amp=auto becomes bf16 or none here, for this device, so every use below sees a concrete
        # choice whoever built the settings.
        self.settings = replace(settings, amp=resolve_amp(settings.amp, device))
        self.device = device
        self.checkpoints = checkpoints
        self.ema = ema
        self.callbacks = list(callbacks)
        self.extra_state = dict(extra_state or {})
        self.is_main = is_main
        self.state = TrainingState()
        self.skipped_batches = 0
        self.last_checkpoint: Path | None = None
        self._check_amp()
        # float16 needs loss scaling; bfloat16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.settings.amp == "fp16")

    # -- public ------------------------------------------------------------------------------

    def fit(self, resume_from: Path | None = None) -> TrainingState:
        if resume_from is not None:
            self.load_state(resume_from)
        self._emit("on_train_start", self.state)
        status = "failed"
        try:
            while self.state.epoch < self.settings.epochs:
                self._train_one_epoch()
                metrics = self._maybe_evaluate()
                self.state.metrics.update(metrics)
                # Every rank's RNG state for this epoch's checkpoints, gathered BEFORE the callbacks:
                # one may wait for the other ranks (Ray Train's report does), and a collective that
                # rank 0 entered after it would never meet the others.
                rng_states = gather_rng_states() if self.checkpoints is not None else None
                self._emit("on_epoch_end", self.state, metrics)
                self._save_epoch_checkpoints(metrics, rng_states)
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            path = self._save("interrupt")
            raise TrainingInterrupted(path) from None
        finally:
            self._emit("on_train_end", self.state, status)
        return self.state

    def evaluate(self) -> dict[str, float]:
        """Evaluate the EMA weights when EMA is on, else the model."""
        if self.val_loader is None or self.evaluator is None:
            return {}
        model = self.ema.module if self.ema is not None else self.model
        with self._autocast():
            return evaluate_model(model, self.val_loader, self.postprocess, self.evaluator, self.device)

    def state_dict(self, rng_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything a resume needs. ``rng_states``: every rank's (``gather_rng_states``), stored as
        ``rng_ranks`` when there are several; ``rng`` is rank 0's (or this process's) either way."""
        model = self.model.module if hasattr(self.model, "module") else self.model
        rng_states = rng_states or [capture_rng_state()]
        return {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "training_state": asdict(self.state),
            "sampler": self.sampler.state_dict(),
            "rng": rng_states[0],
            **({"rng_ranks": rng_states} if len(rng_states) > 1 else {}),
            "skipped_batches": self.skipped_batches,
            **self.extra_state,
        }

    def load_state(self, path: Path) -> None:
        from detr.checkpoints.format import load_checkpoint

        data = load_checkpoint(path, map_location=self.device)
        model = self.model.module if hasattr(self.model, "module") else self.model
        model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.scaler.load_state_dict(data["scaler"])
        if self.ema is not None and data.get("ema") is not None:
            self.ema.load_state_dict(data["ema"])
        self.state = TrainingState(**data["training_state"])
        self.skipped_batches = data.get("skipped_batches", 0)
        restore_own_rng_state(data)
        self.last_checkpoint = Path(path)

    # -- the loop ----------------------------------------------------------------------------

    def _train_one_epoch(self) -> None:
        self.model.train()
        self.criterion.train()
        self.sampler.set_epoch(self.state.epoch, start=self.state.samples_in_epoch)
        accum = self.settings.grad_accum_steps
        bar = tqdm(
            total=len(self.sampler) // _batch_size(self.train_loader) // accum,
            desc=f"epoch {self.state.epoch + 1}/{self.settings.epochs}",
            disable=not (self.settings.progress and self.is_main),
            leave=False,
        )
        micro: list[tuple[Any, Any, Any]] = []
        start = time.perf_counter()
        images_seen = 0
        for batch in self.train_loader:
            micro.append(batch)
            if len(micro) < accum:
                continue
            losses = self._optimizer_step(micro)
            images_seen += sum(len(b[2]) for b in micro)
            self.state.samples_in_epoch += sum(len(b[2]) for b in micro)
            micro = []
            if losses is None:
                continue
            self._emit("on_step_end", self.state, losses)
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", img_s=f"{images_seen / (time.perf_counter() - start):.1f}")
            every = self.settings.checkpoint_every_steps
            if every and self.state.step % every == 0:
                self._save("step", gather_rng_states())
        bar.close()
        # A tail shorter than grad_accum_steps is dropped, as a sampler with drop_last would.
        self.state.epoch += 1
        self.state.samples_in_epoch = 0

    def _optimizer_step(self, micro: list[tuple[Any, Any, Any]]) -> dict[str, float] | None:
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        # Under accumulation each micro-batch's losses are its share of the whole step's loss (the
        # criterion normalizes by the step's box count): the shares add up, whatever each holds.
        step_targets = [target for _, _, targets in micro for target in targets] if len(micro) > 1 else None
        for index, (images, masks, targets) in enumerate(micro):
            images, masks = images.to(self.device), masks.to(self.device)
            targets = [{k: _to(v, self.device) for k, v in t.items()} for t in targets]
            sync = index == len(micro) - 1 or not hasattr(self.model, "no_sync")
            with (nullcontext() if sync else self.model.no_sync()), self._autocast():
                # Denoising training aids build their queries from the targets.
                with_targets = getattr(getattr(self.model, "module", self.model), "trains_with_targets", False)
                outputs = self.model(images, masks, targets) if with_targets else self.model(images, masks)
                terms = self.criterion(outputs, targets, step_targets=step_targets)
            weights = self.criterion.weight_dict
            loss = sum(terms[k] * weights[k] for k in terms if k in weights)
            if not torch.isfinite(loss):
                if self._handle_nonfinite(loss, targets):
                    return None
            self.scaler.scale(loss).backward()
            for name, value in terms.items():
                # Loss shares add up; the logged error rates are per micro-batch: average those.
                share = name.startswith("loss") or name == "weighted_total"
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / (1 if share else len(micro))
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        if self.settings.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            totals["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_max_norm)
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model.module if hasattr(self.model, "module") else self.model)
        self.state.step += 1
        totals["lr"] = self.optimizer.param_groups[0]["lr"]
        return totals

    def _handle_nonfinite(self, loss: torch.Tensor, targets: list[dict]) -> bool:
        """Skip the batch (True) when the settings allow it, else raise with what to look at."""
        image_ids = [t["image_id"] for t in targets]
        if self.settings.on_nonfinite_loss == "skip":
            self.skipped_batches += 1
            self.optimizer.zero_grad(set_to_none=True)
            return True
        last = self.last_checkpoint or "none written yet"
        raise NonFiniteLossError(
            f"loss is {float(loss.detach())} at step {self.state.step + 1} (epoch {self.state.epoch + 1}) for images "
            f"{image_ids}; last good checkpoint: {last}. Lower train.lr, check those images' boxes, or set "
            "train.on_nonfinite_loss=skip to skip such batches (they are counted)"
        )

    # -- evaluation and checkpoints ------------------------------------------------------------

    def _maybe_evaluate(self) -> dict[str, float]:
        if self.state.epoch % self.settings.eval_every_epochs and self.state.epoch != self.settings.epochs:
            return {}
        metrics = self.evaluate()
        if self.skipped_batches:
            metrics["train/skipped_batches"] = float(self.skipped_batches)
        return metrics

    def _save_epoch_checkpoints(self, metrics: dict[str, float], rng_states: list[dict[str, Any]] | None) -> None:
        if self.checkpoints is None:
            return
        self._save("epoch", rng_states)
        value = metrics.get(self.settings.best_metric)
        if value is not None and self.checkpoints.is_better(value, self.state.best_metric):
            self.state.best_metric = value
            if self.is_main:
                path = self.checkpoints.save_best(self.state_dict(rng_states))
                self._emit("on_checkpoint", self.state, path, "best")

    def _save(self, kind: str, rng_states: list[dict[str, Any]] | None = None) -> Path | None:
        """Rank 0 writes a checkpoint. Step and epoch checkpoints are reached by every rank at the same
        step and get every rank's RNG state from their callers; an interrupt reaches the ranks at
        different moments, so its checkpoint has rank 0's only (a collective there could wait forever)."""
        if self.checkpoints is None or not self.is_main:
            return None
        path = self.checkpoints.save(self.state_dict(rng_states), self.state.step)
        self.last_checkpoint = path
        self._emit("on_checkpoint", self.state, path, kind)
        return path

    # -- helpers -------------------------------------------------------------------------------

    def _autocast(self):
        if self.settings.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.settings.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _check_amp(self) -> None:
        if self.settings.amp == "fp16" and self.device.type != "cuda":
            raise DetrError("train.amp=fp16 needs a CUDA device; on CPU use train.amp=bf16 or none")

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable, postprocess: Callable, evaluator: Evaluator,
                   device: torch.device, *, progress: bool = False) -> dict[str, float]:
    """Predict every batch of ``loader``, gather across ranks, and compute the evaluator's metrics."""
    model.eval()
    evaluator.reset()
    for images, masks, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        outputs = model(images.to(device), masks.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)  # [B, 2] (H, W)
        predictions = postprocess(outputs, sizes)
        for prediction, target in zip(predictions, targets):
            prediction["image_id"] = target["image_id"]
        evaluator.update(predictions)
    evaluator.gather()
    return evaluator.compute()


class TrainingInterrupted(DetrError):
    """Ctrl-C: a checkpoint was written (when a checkpoint directory is set) before stopping."""

    exit_code = 130  # the shell's code for SIGINT

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        where = f"checkpoint saved to {checkpoint}; resume with --resume {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"training interrupted; {where}")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _batch_size(loader: Iterable) -> int:
    return getattr(loader, "batch_size", None) or 1
