"""Data-parallel training on Ray Train: the same ``train_from_config`` in each worker of a
``TorchTrainer`` (``detr train CONFIG --workers N``).

Ray Train starts N worker processes (on this machine's Ray, or on the cluster ``--address`` /
``RAY_ADDRESS`` names), makes their process group (gloo on CPU, NCCL on GPU) and runs
``train_from_config`` in each; ``detr.engine.distributed`` finds the group and the training is the
torchrun one: rank r sees every N-th image of the epoch's permutation, DDP averages gradients,
rank 0 alone writes checkpoints and logs to MLflow. Relative paths of the config (datasets,
checkpoints, a SQLite store) mean what they mean where the command was typed: each worker works
in that directory when its machine has it (on a cluster, use shared or absolute paths).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from detr.config import Config, config_from_dict
from detr.errors import ConfigError, DetrError, InvalidInputError
from detr.run import TrainOutcome, train_from_config
from detr.search.cluster import check_cluster_settings, ray_connection


@dataclass(frozen=True)
class WorkerGroup:
    """N Ray Train workers, each with ``cpus`` CPUs and ``gpus`` GPUs (a fraction shares one)."""

    workers: int
    cpus: float = 1.0
    gpus: float = 0.0

    def check(self, *, workers_flag: str) -> None:
        problems = []
        if self.workers < 1:
            problems.append(f"{workers_flag} must be at least 1, got {self.workers}")
        if self.cpus <= 0:
            problems.append(f"--cpus-per-worker must be above 0, got {self.cpus:g}")
        if self.gpus < 0:
            problems.append(f"--gpus-per-worker must be 0 or more, got {self.gpus:g}")
        if problems:
            raise InvalidInputError("; ".join(problems))

    @property
    def per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def scaling_config(self) -> ray.train.ScalingConfig:
        return ray.train.ScalingConfig(num_workers=self.workers, use_gpu=self.gpus > 0,
                                       resources_per_worker=self.per_worker)


def check_device(config: Config, group: WorkerGroup) -> None:
    """The config's device and the workers' GPUs must agree, before Ray starts anything."""
    device = config.train.device
    if device == "cuda" and not group.gpus:
        raise ConfigError("train.device is cuda but --gpus-per-worker is 0: give each worker a GPU "
                          "(--gpus-per-worker 1), or set train.device=cpu")
    if device == "cpu" and group.gpus:
        raise ConfigError(f"train.device is cpu but --gpus-per-worker is {group.gpus:g}: set train.device=cuda "
                          "(or auto), or drop --gpus-per-worker")


def train_on_ray(config: Config, group: WorkerGroup, *, address: str | None = None,
                 resume: str | None = None, track: bool = True) -> TrainOutcome:
    """Train as ``config`` says with ``group.workers`` Ray Train workers; as ``train_from_config``."""
    group.check(workers_flag="--workers")
    check_device(config, group)
    if config.data.train is None:
        raise ConfigError("data.train is not set: the config must name the training dataset(s)")
    from detr.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri)
    resolved = config.to_dict()
    resolved["tracking"]["tracking_uri"] = tracking_uri  # the workers do not have this shell's environment
    storage = tempfile.mkdtemp(prefix="detr-ray-train-")  # Ray Train's run state; nothing is reported into it
    try:
        with ray_connection(address, {}):
            check_cluster_settings(group.per_worker, workers=group.workers, tracking_uri=tracking_uri if track
                                   else None, what="--workers")
            # Rank 0 hands its outcome back through this queue (an actor: reachable from any node);
            # Ray Train keeps only reports that come with a checkpoint.
            outcomes = Queue(maxsize=1, actor_options={"num_cpus": 0})
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config={"config": resolved, "resume": resume, "track": track, "root": str(Path.cwd()),
                                   "outcomes": outcomes},
                scaling_config=group.scaling_config(),
                run_config=ray.train.RunConfig(name="detr-train", storage_path=storage),
            )
            try:
                result = trainer.fit()
            except ray.train.TrainingFailedError as e:
                raise DetrError(f"training on {group.workers} Ray workers failed: {worker_error(e)}") from None
            summary = outcomes.get(timeout=60)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return TrainOutcome(
        epochs=int(summary["epochs"]), steps=int(summary["steps"]), metrics=dict(summary["metrics"]),
        best_metric=summary["best_metric"], checkpoint_dir=Path(summary["checkpoint_dir"]),
        last_checkpoint=Path(summary["last_checkpoint"]) if summary["last_checkpoint"] else None,
        run_id=summary["run_id"], served_model_uri=summary["served_model_uri"])


def worker_error(error: BaseException) -> str:
    """The message of the exception a worker raised: Ray wraps it in tracebacks of its own, and the
    worker's own exception is the last line that names an error."""
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError: rank -> exception
    text = str(next(iter(failures.values()))) if failures else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    named = [line for line in lines if "Error: " in line]
    return (named or lines or [type(error).__name__])[-1]


def enter_launch_directory(root: str) -> None:
    """Work where the command was typed, when this machine has that directory (relative paths)."""
    if os.path.isdir(root):
        os.chdir(root)


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: ``train_from_config`` in the process group Ray Train made."""
    enter_launch_directory(loop_config["root"])
    context = ray.train.get_context()
    config = config_from_dict(loop_config["config"], source=f"Ray Train worker {context.get_world_rank()}")
    main = context.get_world_rank() == 0
    outcome = train_from_config(config, resume=loop_config["resume"], track=loop_config["track"], progress=main)
    if main:
        loop_config["outcomes"].put({
            "epochs": outcome.epochs, "steps": outcome.steps, "metrics": outcome.metrics,
            "best_metric": outcome.best_metric, "checkpoint_dir": str(outcome.checkpoint_dir),
            "last_checkpoint": str(outcome.last_checkpoint) if outcome.last_checkpoint else None,
            "run_id": outcome.run_id, "served_model_uri": outcome.served_model_uri,
        })
