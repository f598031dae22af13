"""The config boundary: a resolved ``Config`` in, a trained model and its checkpoints out.

This is where the config is unpacked into typed arguments for the data loaders, model, criterion,
optimizer, schedule, evaluator, trainer and MLflow tracking; nothing below receives the config
object. It is also where training is handed the serve side's model logger
(``deploy.packaging.log_detr_model``), so that neither the engine nor the tracking imports
``deploy``. The CLI, the MLproject entry points, the search's trials and notebooks all call
``train_from_config``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from detr.checkpoints.format import CheckpointDirectory, load_checkpoint
from detr.config import Config
from detr.data.dataset import DetectionDataset
from detr.data.labelmap import LabelMap
from detr.data.loader import build_loader
from detr.data.sources import load_splits
from detr.data.transforms import build_split_transforms
from detr.engine.callbacks import Callback, EpochSummary
from detr.engine.diagnostics import DiagnosticReport
from detr.engine.distributed import DistributedContext, init_distributed, shutdown_distributed
from detr.engine.evaluation import Evaluator
from detr.engine.optim import build_optimizer, build_scheduler
from detr.engine.sampler import ResumableSampler
from detr.engine.trainer import Trainer, TrainerSettings, evaluate_model
from detr.errors import CheckpointError, ConfigError
from detr.models.build import build_criterion, build_model, build_postprocess
from detr.models.detection_params import DEFAULT_SCORE_THRESHOLD

if TYPE_CHECKING:
    from detr.tracking.continuation import RunContinuation


@dataclass(frozen=True)
class TrainOutcome:
    epochs: int
    steps: int
    metrics: dict[str, float]
    best_metric: float | None
    checkpoint_dir: Path
    last_checkpoint: Path | None
    run_id: str | None
    # The pyfunc model logged from the best checkpoint (models:/<name>@<alias> when registered).
    served_model_uri: str | None = None


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_resume(resume: str | Path | None, checkpoints: CheckpointDirectory) -> Path | None:
    """``None`` (fresh start), ``"auto"`` (the newest step checkpoint, if any) or a path."""
    if resume is None:
        return None
    if str(resume) == "auto":
        return checkpoints.latest()
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: checkpoint file not found (use a path or 'auto')")
    return path


def refuse_stale_checkpoints(checkpoints: CheckpointDirectory) -> None:
    """A fresh start must not write into another run's checkpoints: they would mix, and a later
    ``--resume auto`` could continue the wrong run."""
    stale = [*checkpoints.step_checkpoints(), *([checkpoints.best_path] if checkpoints.best_path.is_file() else [])]
    if stale:
        raise CheckpointError(
            f"train.checkpoint.dir {checkpoints.directory} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in stale[-3:])}): continue that run with --resume auto, or set "
            "train.checkpoint.dir to a new directory (or remove those files) to start afresh"
        )


@dataclass(frozen=True)
class CheckpointRun:
    """The MLflow run a checkpoint was written under (None when trained untracked) and its step."""

    run_id: str | None
    step: int


def checkpoint_run(checkpoint: Path) -> CheckpointRun:
    data = load_checkpoint(checkpoint)
    return CheckpointRun(run_id=data.get("mlflow_run_id"), step=int(data["training_state"]["step"]))


def check_label_map(checkpoint_path: Path, dataset_map: LabelMap) -> None:
    stored = LabelMap.from_dict(load_checkpoint(checkpoint_path)["label_map"], source=str(checkpoint_path))
    stored.require_same(dataset_map, this=f"checkpoint {checkpoint_path}", that="the configured dataset")


def train_from_config(
    config: Config,
    *,
    resume: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    track: bool = True,
    progress: bool = True,
) -> TrainOutcome:
    """Train as ``config`` says; ``resume`` continues a run exactly (a path or ``"auto"``)."""
    if config.data.train is None:
        raise ConfigError("data.train is not set: the config must name the training dataset(s)")
    train_cfg = config.train
    device = resolve_device(train_cfg.device)
    dist_ctx = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_ctx.local_rank)
    try:
        splits = load_splits(config.data)
        train_set, val_set = splits["train"], splits.get("val")
        label_map = train_set.label_map
        checkpoints = CheckpointDirectory(train_cfg.checkpoint.dir, keep_last=train_cfg.checkpoint.keep_last,
                                          metric=train_cfg.checkpoint.best_metric, mode=train_cfg.checkpoint.best_mode)
        resume_path = resolve_resume(resume, checkpoints)
        if resume_path is not None:
            check_label_map(resume_path, label_map)
        else:
            refuse_stale_checkpoints(checkpoints)

        trainer = _build_trainer(config, train_set, val_set, label_map, device, dist_ctx, checkpoints,
                                 callbacks, progress)
        run_id = served_model_uri = None
        if track and dist_ctx.is_main:
            from detr.tracking import prepare_continuation, tracked_run

            tracking = config.tracking
            continuation = None
            # A resume continues the run its checkpoint names (under `mlflow run`, the project's run).
            if resume_path is not None and "MLFLOW_RUN_ID" not in os.environ:
                stored = checkpoint_run(resume_path)
                continuation = prepare_continuation(stored.run_id, checkpoint_step=stored.step,
                                                    tracking_uri=tracking.tracking_uri)
            with tracked_run(tracking_uri=tracking.tracking_uri, experiment=tracking.experiment,
                             run_name=tracking.run_name, log_system_metrics=tracking.log_system_metrics,
                             run_id=continuation.run_id if continuation is not None else None) as run:
                run_id = run.info.run_id
                # Checkpoints name their run: `detr register` logs the model into it, a resume continues it.
                trainer.extra_state["mlflow_run_id"] = run_id
                mlflow_callback = _mlflow_callback(config, trainer, train_set, val_set, continuation)
                trainer.callbacks.append(mlflow_callback)
                trainer.fit(resume_path)
                if mlflow_callback.logged_model is not None:
                    served_model_uri = mlflow_callback.logged_model.serving_uri
        else:
            trainer.fit(resume_path)
        state = trainer.state
        return TrainOutcome(epochs=state.epoch, steps=state.step, metrics=dict(state.metrics),
                            best_metric=state.best_metric, checkpoint_dir=checkpoints.directory,
                            last_checkpoint=trainer.last_checkpoint, run_id=run_id,
                            served_model_uri=served_model_uri)
    finally:
        shutdown_distributed()


def _build_trainer(
    config: Config,
    train_set: DetectionDataset,
    val_set: DetectionDataset | None,
    label_map: LabelMap,
    device: torch.device,
    dist_ctx: DistributedContext,
    checkpoints: CheckpointDirectory,
    callbacks: Sequence[Callback],
    progress: bool,
) -> Trainer:
    train_cfg, data_cfg = config.train, config.data
    # Same seed on every rank: identical initial weights (DDP also broadcasts them from rank 0).
    torch.manual_seed(train_cfg.seed)
    model = build_model(config.model, len(label_map)).to(device)
    criterion = build_criterion(config.model, len(label_map)).to(device)
    postprocess = build_postprocess(config.model)

    sampler = ResumableSampler(len(train_set), shuffle=True, seed=train_cfg.seed,
                               rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    train_loader = build_loader(train_set, build_split_transforms(data_cfg.transforms, "train"),
                                batch_size=train_cfg.batch_size, shuffle=False, num_workers=data_cfg.num_workers,
                                sampler=sampler, seed=train_cfg.seed)
    val_loader = evaluator = None
    if val_set is not None and len(val_set):
        val_sampler = ResumableSampler(len(val_set), shuffle=False, seed=train_cfg.seed,
                                       rank=dist_ctx.rank, world_size=dist_ctx.world_size)
        val_loader = build_loader(val_set, build_split_transforms(data_cfg.transforms, "val"),
                                  batch_size=train_cfg.batch_size, shuffle=False, num_workers=data_cfg.num_workers,
                                  sampler=val_sampler, seed=train_cfg.seed)
        evaluator = Evaluator(val_set)

    # Parameter groups are chosen by name ("backbone.", ...): build them from the bare model, since
    # the DDP wrapper prefixes every name with "module.". DDP shares the same parameter objects.
    optimizer = build_optimizer(model, lr=train_cfg.lr, lr_backbone=train_cfg.lr_backbone,
                                lr_linear_proj_mult=train_cfg.lr_linear_proj_mult,
                                weight_decay=train_cfg.weight_decay)
    if dist_ctx.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
    steps_per_epoch = max(1, len(sampler) // train_cfg.batch_size // train_cfg.grad_accum_steps)
    schedule = train_cfg.schedule
    scheduler = build_scheduler(optimizer, kind=schedule.kind, steps_per_epoch=steps_per_epoch,
                                epochs=train_cfg.epochs, milestones=schedule.milestones, gamma=schedule.gamma,
                                warmup_steps=schedule.warmup_steps, min_lr_ratio=schedule.min_lr_ratio)
    ema = None
    if train_cfg.ema.enabled:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        base = model.module if dist_ctx.enabled else model
        ema = AveragedModel(base, multi_avg_fn=get_ema_multi_avg_fn(train_cfg.ema.decay), use_buffers=True)

    settings = TrainerSettings(
        epochs=train_cfg.epochs,
        grad_accum_steps=train_cfg.grad_accum_steps,
        clip_max_norm=train_cfg.clip_max_norm,
        amp=train_cfg.amp,
        checkpoint_every_steps=train_cfg.checkpoint.every_steps,
        eval_every_epochs=train_cfg.eval_every_epochs,
        best_metric=train_cfg.checkpoint.best_metric,
        on_nonfinite_loss=train_cfg.on_nonfinite_loss,
        progress=progress,
    )
    if progress:
        callbacks = [*callbacks, EpochSummary()]
    return Trainer(model=model, criterion=criterion, postprocess=postprocess, train_loader=train_loader,
                   sampler=sampler, optimizer=optimizer, scheduler=scheduler, settings=settings, device=device,
                   checkpoints=checkpoints, val_loader=val_loader, evaluator=evaluator, ema=ema,
                   callbacks=callbacks, is_main=dist_ctx.is_main,
                   extra_state={"config": config.to_dict(), "label_map": label_map.to_dict()})


def _mlflow_callback(config: Config, trainer: Trainer, train_set: DetectionDataset,
                     val_set: DetectionDataset | None, continuation: RunContinuation | None = None) -> Callback:
    from deploy.packaging import log_detr_model
    from detr.engine.overlays import OverlayRenderer
    from detr.engine.pr_curves import coco_curves, pr_figure
    from detr.ops.dispatch import choose_backend
    from detr.tracking import MlflowCallback

    def pr_curves():
        result = trainer.evaluator.last_result if trainer.evaluator is not None else None
        if result is None or result.coco is None:
            return None
        return pr_figure(coco_curves(result.coco), title="Precision-recall at IoU 0.5 (COCO)")

    def diagnostics():
        evaluator = trainer.evaluator
        if evaluator is None or evaluator.last_result is None:
            return None
        return evaluator.report(DEFAULT_SCORE_THRESHOLD)

    overlays = None
    if val_set is not None and len(val_set) and config.tracking.num_overlay_images:
        overlays = OverlayRenderer(trainer, val_set, config.data.transforms, config.tracking.num_overlay_images)
    variant = config.model.arch
    if config.model.arch == "deformable_detr":
        variant += "+refine" if config.model.deformable.with_box_refine else ""
        variant += "+two_stage" if config.model.deformable.two_stage else ""
    elif config.model.detr.two_stage:
        variant += "+two_stage"
    return MlflowCallback(
        config=config.to_dict(),
        label_map=train_set.label_map.to_dict(),
        datasets={
            "training": (train_set, [s.path for s in config.data.train.sources]),
            **({"validation": (val_set, [s.path for s in config.data.val.sources])} if val_set is not None else {}),
        },
        tags={"model_variant": variant, "backbone": config.model.backbone.name,
              "msda_backend": choose_backend("auto", trainer.device.type), "amp": trainer.settings.amp},
        overlays=overlays,
        pr_curves=pr_curves,
        diagnostics=diagnostics,
        log_every_steps=config.tracking.log_every_steps,
        served_model=((config.tracking.registered_model, config.tracking.registered_alias)
                      if config.tracking.log_model else None),
        log_model=log_detr_model,
        continuation=continuation,
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    config: Config | None = None,
    split: str = "val",
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, float]:
    """COCO and VOC metrics of a checkpoint on a split of ``config``'s data (default: the config
    stored in the checkpoint). The checkpoint's label map must equal the dataset's."""
    evaluator = _evaluate_checkpoint(checkpoint, config=config, split=split, batch_size=batch_size, device=device,
                                     progress=progress)
    return dict(evaluator.last_result.metrics)


def evaluate_checkpoint_report(
    checkpoint: str | Path,
    *,
    config: Config | None = None,
    split: str = "val",
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    draw: bool = True,
) -> tuple[dict[str, float], DiagnosticReport]:
    """As :func:`evaluate_checkpoint`, plus the diagnostics at ``score_threshold`` (confusion matrix,
    TIDE errors, per-class numbers, the worst images drawn when ``draw``); the metrics include the
    diagnostics' numbers (``confusion/...``, ``tide/...``)."""
    evaluator = _evaluate_checkpoint(checkpoint, config=config, split=split, batch_size=batch_size, device=device,
                                     progress=progress)
    metrics = evaluator.last_result.metrics
    report = evaluator.report(score_threshold, draw=draw)
    return {**metrics, **report.metrics()}, report


def _evaluate_checkpoint(checkpoint: str | Path, *, config: Config | None, split: str, batch_size: int | None,
                         device: str, progress: bool) -> Evaluator:
    from detr.checkpoints.load import load_model

    torch_device = resolve_device(device)
    model, stored_config, label_map = load_model(checkpoint, device=torch_device)
    config = config or stored_config
    splits = load_splits(config.data)
    if split not in splits:
        raise ConfigError(f"split {split!r} is not configured; configured splits: {sorted(splits)}")
    dataset = splits[split]
    label_map.require_same(dataset.label_map, this=f"checkpoint {checkpoint}", that=f"the {split} dataset")
    loader = build_loader(dataset, build_split_transforms(config.data.transforms, "val"),
                          batch_size=batch_size or config.train.batch_size, shuffle=False,
                          num_workers=config.data.num_workers)
    evaluator = Evaluator(dataset)
    evaluate_model(model, loader, build_postprocess(config.model), evaluator, torch_device, progress=progress)
    return evaluator
