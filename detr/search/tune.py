"""``run_search``: a hyperparameter search with Ray Tune's ASHA scheduler, recorded in MLflow.

A trial is ``train_from_config`` on the base config plus the trial's dotted overrides (the search
space, ``detr.search.space``), run by ``detr.search.trial``. ASHA stops the trials that fall behind
at a rung; a restored search (``resume=True``, ``Tuner.restore``) continues each unfinished trial
exactly from its last checkpoint.

Only the driver writes to MLflow: one sweep run (search space, base config, the best trial's params
and metric, a plot of every trial, the best checkpoint as the pyfunc model; ``detr.search.runs``)
and one child run per trial (``detr.search.trial_runs``). This module drives Ray and calls no mlflow
itself. Ray is this machine's or an existing cluster's (``detr.search.cluster``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from deploy.packaging import log_detr_model
from detr.config import MODEL_ALIAS_RULE, Config, is_valid_model_alias
from detr.engine.coco_eval import STAT_NAMES as COCO_STAT_NAMES
from detr.errors import ConfigError, DetrError, InvalidInputError
from detr.search.cluster import check_cluster_settings, ray_connection, starts_local_ray, worker_capacity
from detr.search.ray_train import WorkerGroup, check_device
from detr.search.runs import (SearchInterrupted, SearchOutcome, TrialSummary, child_runs, log_search_results,
                              resumed_sweep_run, summarize_trials, sweep_run)
from detr.search.space import Choice, Grid, LogUniform, RandInt, SearchSpace, Uniform
from detr.search.trial import CHECKPOINT_FILE, EPOCH_LOSS, scratch_directory, train_trial
from detr.search.trial_runs import trial_run_logger
from detr.search.trial_workers import (TRAIN_RUNS, ReleaseWorkerResources, best_reported_checkpoint,
                                      train_trial_on_workers)
from detr.tracking import resolve_tracking_uri

DEFAULT_STORAGE = "outputs/tune"
TRIAL_DRIVER_MEMORY = 64 * 1024**2  # bytes Ray reserves for the driver of a multi-worker trial
# What an epoch reports (detr.engine.evaluation), known before any trial runs; per-class numbers
# add the class name to these prefixes.
SEARCH_METRICS = (*(f"coco/{name}" for name in COCO_STAT_NAMES), "voc/mAP50", "voc/mAP50_11pt", EPOCH_LOSS)
PER_CLASS_METRICS = ("coco/AP/", "voc/AP50/", "voc/AP50_11pt/")


def run_search(
    config: Config,
    space: SearchSpace,
    *,
    num_samples: int,
    max_concurrent_trials: int | None = None,
    address: str | None = None,
    resources_per_trial: Mapping[str, float] | None = None,
    storage_path: str | Path = DEFAULT_STORAGE,
    metric: str = "coco/AP50",
    mode: str = "max",
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    name: str | None = None,
    resume: bool = False,
    register: tuple[str, str | None] | None = None,
    progress: bool = True,
    workers_per_trial: WorkerGroup | None = None,
    max_failures: int = 2,
) -> SearchOutcome:
    """Search ``space`` around ``config`` with ASHA; return the trials and the best one.

    ``num_samples`` draws of the space (each runs every ``grid`` combination); ASHA stops a trial at
    a rung (``grace_period`` epochs, then times ``reduction_factor``) when its ``metric`` is worse
    than the rung's better fraction; no trial trains past ``train.epochs``. ``register=(name,
    alias)`` registers the best trial's model. ``resume`` continues the search ``name`` in
    ``storage_path`` after an interruption; the config, space and ASHA settings must be the same.

    ``workers_per_trial`` makes each trial a Ray Train ``TorchTrainer`` of that many workers (data
    parallel; ``detr.search.trial_workers``) instead of one process of ``resources_per_trial``. A trial
    whose process (or worker) dies is restarted from its last reported checkpoint up to
    ``max_failures`` times; the sweep run counts the restarts (``trials/retries``).
    """
    if workers_per_trial is not None and resources_per_trial is not None:
        raise InvalidInputError("--cpus-per-trial/--gpus-per-trial are for one-process trials: with "
                                "--workers-per-trial give --cpus-per-worker/--gpus-per-worker")
    if workers_per_trial is not None:
        workers_per_trial.check(workers_flag="--workers-per-trial")
        check_device(config, workers_per_trial)
    if max_failures < 0:
        raise InvalidInputError(f"--max-failures must be 0 or more, got {max_failures}")
    resources = dict(resources_per_trial or {"cpu": 1, "gpu": 0})
    _check_settings(config, num_samples=num_samples, max_concurrent_trials=max_concurrent_trials, metric=metric,
                    mode=mode, grace_period=grace_period, reduction_factor=reduction_factor, resources=resources,
                    name=name, resume=resume, register=register)
    start = space.check_against(config)  # every key and edge value, before Ray starts
    max_epochs = start.train.epochs
    if start.train.eval_every_epochs != 1:
        raise ConfigError(f"train.eval_every_epochs is {start.train.eval_every_epochs}: a search evaluates every "
                          "epoch (ASHA compares trials on it); set it to 1")
    if grace_period > max_epochs:
        raise InvalidInputError(f"grace period {grace_period} is longer than train.epochs ({max_epochs})")
    name = name or f"{Path(space.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = str(storage_path) if "://" in str(storage_path) else str(Path(storage_path).resolve())
    experiment_path = f"{storage.rstrip('/')}/{name}"
    definition = {"search.metric": metric, "search.mode": mode, "search.num_samples": num_samples,
                  "search.trials": num_samples * space.grid_size(), "search.max_epochs": max_epochs,
                  "search.grace_period": grace_period, "search.reduction_factor": float(reduction_factor),
                  "search.config_digest": _digest(config.to_dict()), "search.space_digest": space.digest()}
    exists = tune.Tuner.can_restore(experiment_path)
    if resume and not exists:
        raise InvalidInputError(f"--resume: no search named {name!r} in {storage} to continue")
    if exists and not resume:
        raise InvalidInputError(f"a search named {name!r} already exists in {storage}: continue it with "
                                f"--resume --name {name}, or give another --name")
    resumed_run_id = resumed_sweep_run(config, name=name, experiment_path=experiment_path,
                                       definition=definition) if resume else None
    # Trials on this machine keep their scratch checkpoints in one directory the driver deletes at
    # the end (Ray stops a finished trial right after its last report, before it could clean up);
    # on a cluster each trial uses its own working directory on its node.
    with (scratch_directory(name) if starts_local_ray(address) else nullcontext()) as scratch_root, \
            ray_connection(address, resources if workers_per_trial is None else {}):
        per_worker = workers_per_trial.per_worker if workers_per_trial else {"CPU": resources["cpu"],
                                                                              "GPU": resources.get("gpu", 0)}
        workers = workers_per_trial.workers if workers_per_trial else 1
        check_cluster_settings(per_worker, workers=workers, what="--workers-per-trial" if workers_per_trial
                               else "a trial", storage=storage,
                               tracking_uri=resolve_tracking_uri(config.tracking.tracking_uri),
                               gpu_flag="--gpus-per-worker" if workers_per_trial else "--gpus-per-trial")
        if workers_per_trial is None:
            trainable = tune.with_resources(
                tune.with_parameters(train_trial, base_config=config.to_dict(), fixed=space.fixed, metric=metric,
                                     root=str(Path.cwd()), scratch_root=scratch_root),
                resources,
            )
        else:
            # The trial itself only drives its TorchTrainer, whose workers hold the CPUs and GPUs (a
            # CPU held by the driver would be missing for a worker); Ray wants some resource in a
            # trial's request: the driver's memory. Tune does not see the workers' resources: it
            # starts no more trials than the cluster holds worker groups.
            trainable = tune.with_resources(
                tune.with_parameters(train_trial_on_workers, base_config=config.to_dict(), fixed=space.fixed,
                                     metric=metric, mode=mode, root=str(Path.cwd()), scratch_root=scratch_root,
                                     workers=asdict(workers_per_trial), max_failures=max_failures,
                                     train_storage=f"{experiment_path}/{TRAIN_RUNS}"),
                {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
            )
            fitting = max(1, worker_capacity(per_worker) // workers)
            max_concurrent_trials = min(max_concurrent_trials or fitting, fitting)
        with sweep_run(config, space, name=name, experiment_path=experiment_path, definition=definition,
                       resumed_run_id=resumed_run_id) as sweep_run_id:
            if progress:
                print(f"search {name}: {definition['search.trials']} trials, ASHA on {metric} ({mode}), at most "
                      f"{max_epochs} epochs each; state in {experiment_path}; MLflow run {sweep_run_id}", flush=True)
            if resume:
                tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
            else:
                tuner = _new_tuner(trainable, space, name=name, storage=storage, metric=metric, mode=mode,
                                   num_samples=num_samples, max_concurrent_trials=max_concurrent_trials,
                                   max_epochs=max_epochs, grace_period=grace_period,
                                   reduction_factor=reduction_factor, sweep_run_id=sweep_run_id, progress=progress,
                                   # Worker restarts of a multi-worker trial are Ray Train's.
                                   max_failures=max_failures if workers_per_trial is None else 0)
            grid = tuner.fit()
            # Ray ends an interrupted search normally and marks its running trials terminated; a
            # trial that finished or that ASHA stopped has a last result with done=True.
            if any(r.error is None and not (r.metrics or {}).get("done") for r in grid):
                raise SearchInterrupted(name, experiment_path)
            trials = summarize_trials(grid, metric=metric, mode=mode, max_epochs=max_epochs,
                                      runs=child_runs(sweep_run_id))
            best_result = _best_result(grid, trials, metric, mode)
            best = next(t for t in trials if t.trial_id == best_result.metrics["trial_id"])
            # A multi-worker trial's checkpoints are its TorchTrainer's: Tune saw their paths only.
            checkpoint = (best_reported_checkpoint(best_result, metric, mode) if workers_per_trial
                          else best_result.get_best_checkpoint(metric, mode))
            with checkpoint.as_directory() as directory:
                served = log_search_results(trials, best, metric=metric, mode=mode,
                                            checkpoint=Path(directory) / CHECKPOINT_FILE, register=register,
                                            log_model=log_detr_model)
    return SearchOutcome(name=name, experiment_path=experiment_path, metric=metric, mode=mode, max_epochs=max_epochs,
                         trials=tuple(trials), best=best, sweep_run_id=sweep_run_id,
                         tracking_uri=resolve_tracking_uri(config.tracking.tracking_uri), served_model_uri=served)


def _new_tuner(trainable, space: SearchSpace, *, name: str, storage: str, metric: str, mode: str,
               num_samples: int, max_concurrent_trials: int | None, max_epochs: int, grace_period: int,
               reduction_factor: float, sweep_run_id: str, progress: bool, max_failures: int) -> tune.Tuner:
    trial_runs = trial_run_logger(sweep_run_id)
    return tune.Tuner(
        trainable,
        param_space={key: _ray_domain(d) for key, d in space.searched.items()},
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=num_samples, max_concurrent_trials=max_concurrent_trials,
            # time_attr "epoch": the trial's own count, right after a restore too.
            scheduler=ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=grace_period,
                                    reduction_factor=reduction_factor),
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=1 if progress else 0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            # Keeps the best checkpoints by the metric, and always the latest (to resume from).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            callbacks=[trial_runs, ReleaseWorkerResources(),
                       *([_TrialLines(metric, mode, max_epochs)] if progress else [])],
        ),
    )


def _check_settings(config: Config, *, num_samples, max_concurrent_trials, metric, mode, grace_period,
                    reduction_factor, resources, name, resume, register) -> None:
    problems = []
    if num_samples < 1:
        problems.append(f"the number of samples must be at least 1, got {num_samples}")
    if max_concurrent_trials is not None and max_concurrent_trials < 1:
        problems.append(f"max concurrent trials must be at least 1, got {max_concurrent_trials}")
    if metric not in SEARCH_METRICS and not (metric.startswith(PER_CLASS_METRICS) and metric not in PER_CLASS_METRICS):
        close = difflib.get_close_matches(metric, SEARCH_METRICS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"metric {metric!r} is not one an epoch reports{hint}: choose one of "
                        f"{', '.join(SEARCH_METRICS)}, or a class's AP as "
                        f"{', '.join(p + '<class>' for p in PER_CLASS_METRICS)}")
    if mode not in ("max", "min"):
        problems.append(f"mode must be 'max' or 'min', got {mode!r}")
    if grace_period < 1:
        problems.append(f"grace period must be at least 1 epoch, got {grace_period}")
    if reduction_factor <= 1:
        problems.append(f"reduction factor must be above 1, got {reduction_factor}")
    if resources.get("cpu", 0) <= 0 or resources.get("gpu", 0) < 0:
        problems.append(f"a trial needs a positive number of CPUs and zero or more GPUs, got {resources}")
    if name is not None and not re.fullmatch(r"[\w.-]+", name):
        problems.append(f"search name {name!r} may hold letters, digits, '_', '-' and '.' only")
    if resume and name is None:
        problems.append("resuming needs the name of the search (--name, printed when it started)")
    if register is not None and (not register[0] or not register[0].strip()):
        problems.append("the registered model name is empty")
    if register is not None and register[1] is not None and not is_valid_model_alias(register[1]):
        problems.append(f"alias {register[1]!r}: {MODEL_ALIAS_RULE}")  # checked now, not after the search
    if problems:
        raise InvalidInputError("; ".join(problems))
    if config.data.train is None:
        raise ConfigError("data.train is not set: the config must name the training dataset(s)")
    if config.data.val is None and metric != EPOCH_LOSS:
        raise ConfigError(f"data.val is not set: the search metric {metric!r} is computed on the validation split "
                          f"(set data.val, or search on {EPOCH_LOSS!r} with mode min)")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _ray_domain(distribution):
    match distribution:
        case LogUniform(low, high):
            return tune.loguniform(low, high)
        case Uniform(low, high):
            return tune.uniform(low, high)
        case RandInt(low, high):
            return tune.randint(low, high)
        case Choice(options):
            return tune.choice(list(options))
        case Grid(options):
            return tune.grid_search(list(options))
    raise TypeError(f"not a searched distribution: {distribution!r}")


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


class _TrialLines(tune.Callback):
    """One line per finished trial: how it ended, its epochs, its metric, its params."""

    def __init__(self, metric: str, mode: str, max_epochs: int) -> None:
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0))
        how = "finished" if epochs >= self.max_epochs else "stopped early by ASHA"
        values = trial.metric_analysis.get(self.metric)
        summary = f", {self.metric} last {values['last']:.4f} best {values[self.mode]:.4f}" if values else ""
        print(f"trial {trial} {how} after {epochs}/{self.max_epochs} epochs{summary}; {trial.config}",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        print(f"trial {trial} failed ({trial.config}); its error is in {trial.path}", flush=True)


def _best_result(grid, trials: list[TrialSummary], metric: str, mode: str):
    if not any(t.best_value is not None for t in trials):
        failed = [t for t in trials if t.error]
        if failed:
            raise DetrError(f"all {len(trials)} trials failed; the first: {failed[0].error}")
        raise DetrError(f"no trial reported {metric!r}")
    return grid.get_best_result(metric=metric, mode=mode, scope="all")
