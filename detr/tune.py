"""Hyperparameter search: Ray Tune with the ASHA scheduler, recorded in MLflow. The only module
that imports ray.

A trial is ``train_from_config`` on the base config plus the trial's dotted overrides (the search
space, ``detr.search_space``). After every epoch the trial reports its metrics together with that
epoch's checkpoint, so ASHA can stop a trial that falls behind at a rung, and a restored search
(``resume=True``, ``Tuner.restore``) continues each unfinished trial exactly from its last checkpoint.

Only the driver writes to MLflow; trials run with ``track=False``. A SQLite store takes one writer at
a time, and trials on other machines could not reach a local file anyway. The driver holds one sweep
run (search space, base config, the best trial's params and metric, a plot of every trial, the best
checkpoint as the pyfunc model) and, through Ray's ``MLflowLoggerCallback``, one child run per trial
(tag ``mlflow.parentRunId``) with its sampled params and per-epoch metrics.

On one machine Ray is started here (``num_cpus`` of the machine); with ``address`` (or
``RAY_ADDRESS``) the search runs on an existing cluster, e.g. with a GPU per trial. Each trial then
needs the package installed where it runs, and ``storage_path`` must be shared storage (NFS, S3).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import mlflow
import ray
from mlflow.entities import Metric
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, TIME_TOTAL_S, TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler

from detr.config import MODEL_ALIAS_RULE, Config, config_from_dict, is_valid_model_alias
from detr.engine.callbacks import Callback
from detr.engine.coco_eval import STAT_NAMES as COCO_STAT_NAMES
from detr.errors import ConfigError, DetrError, InvalidInputError
from detr.search_space import Choice, Grid, LogUniform, RandInt, SearchSpace, Uniform, apply_overrides
from detr.search_tracking import (TRIAL_ID_TAG, SearchInterrupted, SearchOutcome, TrialSummary, child_runs,
                                  log_search_results, resumed_sweep_run, summarize_trials, sweep_run)
from detr.tracking import clean_metrics, resolve_tracking_uri

DEFAULT_STORAGE = "outputs/tune"
CHECKPOINT_FILE = "checkpoint.pt"  # the one file in every checkpoint a trial reports
EPOCH_LOSS = "train/loss_mean"  # mean training loss of the epoch, reported next to the evaluation
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
) -> SearchOutcome:
    """Search ``space`` around ``config`` with ASHA; return the trials and the best one.

    ``num_samples`` draws of the space (each runs every ``grid`` combination); ASHA stops a trial at
    a rung (``grace_period`` epochs, then times ``reduction_factor``) when its ``metric`` is worse
    than the rung's better fraction; no trial trains past ``train.epochs``. ``register=(name,
    alias)`` registers the best trial's model. ``resume`` continues the search ``name`` in
    ``storage_path`` after an interruption; the config, space and ASHA settings must be the same.
    """
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
    with (_scratch_directory(name) if _starts_local_ray(address) else nullcontext()) as scratch_root, _ray_connection(address, resources):
        trainable = tune.with_resources(
            tune.with_parameters(_train_trial, base_config=config.to_dict(), fixed=space.fixed, metric=metric,
                                 root=str(Path.cwd()), scratch_root=scratch_root),
            resources,
        )
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
                                   reduction_factor=reduction_factor, sweep_run_id=sweep_run_id, progress=progress)
            grid = tuner.fit()
            # Ray ends an interrupted search normally and marks its running trials terminated; a
            # trial that finished or that ASHA stopped has a last result with done=True.
            if any(r.error is None and not (r.metrics or {}).get("done") for r in grid):
                raise SearchInterrupted(name, experiment_path)
            trials = summarize_trials(grid, metric=metric, mode=mode, max_epochs=max_epochs,
                                      run_ids=child_runs(sweep_run_id))
            best_result = _best_result(grid, trials, metric, mode)
            best = next(t for t in trials if t.trial_id == best_result.metrics["trial_id"])
            with best_result.get_best_checkpoint(metric, mode).as_directory() as directory:
                served = log_search_results(trials, best, metric=metric, mode=mode,
                                            checkpoint=Path(directory) / CHECKPOINT_FILE, register=register)
    return SearchOutcome(name=name, experiment_path=experiment_path, metric=metric, mode=mode, max_epochs=max_epochs,
                         trials=tuple(trials), best=best, sweep_run_id=sweep_run_id,
                         tracking_uri=resolve_tracking_uri(config.tracking.tracking_uri), served_model_uri=served)


def _new_tuner(trainable, space: SearchSpace, *, name: str, storage: str, metric: str, mode: str,
               num_samples: int, max_concurrent_trials: int | None, max_epochs: int, grace_period: int,
               reduction_factor: float, sweep_run_id: str, progress: bool) -> tune.Tuner:
    experiment = mlflow.get_experiment(mlflow.get_run(sweep_run_id).info.experiment_id)
    trial_runs = _TrialRunLogger(tracking_uri=mlflow.get_tracking_uri(), experiment_name=experiment.name,
                                 tags={"mlflow.parentRunId": sweep_run_id}, save_artifact=False)
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
            # Keeps the best checkpoints by the metric, and always the latest (to resume from).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            callbacks=[trial_runs, *([_TrialLines(metric, mode, max_epochs)] if progress else [])],
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


# ---------------------------------------------------------------------------------------------
# Ray: a local instance or an existing cluster
# ---------------------------------------------------------------------------------------------


@contextmanager
def _ray_connection(address: str | None, resources: Mapping[str, float]) -> Iterator[None]:
    """Use the Ray this process already has, connect to ``address`` (or ``RAY_ADDRESS``), or start
    a local one for the machine; disconnect or stop afterwards only what was started here."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if _starts_local_ray(address):
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=100 * 1024**2)
        _check_local_resources(resources)
    else:
        address = address or os.environ["RAY_ADDRESS"]
        _check_reachable(address)
        try:
            ray.init(address=address)
        except ConnectionError as e:
            raise InvalidInputError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _starts_local_ray(address: str | None) -> bool:
    """Whether the search starts a Ray of its own on this machine: no Ray in this process yet, and
    no cluster address given (``address`` or ``RAY_ADDRESS``)."""
    return not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))


def _check_reachable(address: str) -> None:
    """``ray.init`` retries an address nobody listens at for minutes; a TCP connect says so at once."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise InvalidInputError(
            f"no Ray cluster answers at {address!r} ({e.strerror or e}): start one with `ray start --head` (it "
            "prints the address), or correct --address / RAY_ADDRESS"
        ) from None


def _check_local_resources(resources: Mapping[str, float]) -> None:
    """A trial asking for more than this machine has would wait forever: fail now instead."""
    available = ray.cluster_resources()
    for kind, key in (("cpu", "CPU"), ("gpu", "GPU")):
        wanted, have = resources.get(kind, 0), available.get(key, 0)
        if wanted > have:
            ray.shutdown()
            raise InvalidInputError(f"a trial asks for {wanted:g} {key}s but this machine has {have:g}: lower it, or "
                                    "run on a cluster that has them (--address)")


# ---------------------------------------------------------------------------------------------
# the trial (runs in a Ray worker)
# ---------------------------------------------------------------------------------------------


@contextmanager
def _scratch_directory(name: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=f"detr-tune-{name}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _train_trial(sampled: dict[str, Any], *, base_config: dict, fixed: dict[str, Any], metric: str,
                 root: str, scratch_root: str | None) -> None:
    from detr.engine.run import train_from_config

    context = tune.get_context()
    # The checkpoints that matter are the ones reported to Tune: the trainer's own are scratch, in
    # the driver's scratch directory or else the trial's working directory (the trial id keeps the
    # path unique even when RAY_CHDIR_TO_TRIAL_DIR=0 shares one). A trial restarted without a
    # checkpoint starts over, so whatever an earlier attempt left there goes.
    scratch = (Path(scratch_root) if scratch_root else Path.cwd() / "checkpoints") / context.get_trial_id()
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    resume = None
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            resume = Path(shutil.copy2(Path(directory) / CHECKPOINT_FILE, scratch / "restored.pt"))
    # keep_last 1: the epoch checkpoints Tune keeps are copies in its storage, not these files.
    overrides = {**fixed, **sampled, "train.checkpoint.dir": str(scratch), "train.checkpoint.keep_last": 1}
    config = _absolute_paths(apply_overrides(config_from_dict(base_config), overrides,
                                             source=f"trial {context.get_trial_name()}"), Path(root))
    try:
        train_from_config(config, resume=resume, callbacks=[_ReportEachEpoch(metric)], track=False, progress=False)
    finally:
        # Reached when the trial fails or ends between reports; Ray never deletes its session
        # directories (/tmp/ray), where a cluster trial's scratch lives.
        shutil.rmtree(scratch, ignore_errors=True)


def _absolute_paths(config: Config, root: Path) -> Config:
    """Relative dataset and backbone-weight paths, made absolute against the directory the search
    started from (the trial's working directory is another)."""
    raw = config.to_dict()
    for split in ("train", "val"):
        for source in (raw["data"][split] or {}).get("sources", []):
            source["path"] = str(root / source["path"])
    backbone = raw["model"]["backbone"]
    if backbone["weights"]:
        backbone["weights"] = str(root / backbone["weights"])
    return config_from_dict(raw, source="trial config")


class _ReportEachEpoch(Callback):
    """``tune.report`` once per epoch: the evaluation, the epoch's mean loss and its checkpoint.

    The trainer emits ``on_epoch_end`` before it writes the epoch checkpoint, so the metrics wait
    for ``on_checkpoint``. The metric is reported every epoch, NaN when undefined: Tune ranks the
    kept checkpoints by it, and one without it would count as the newest best.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self._losses: list[float] = []
        self._pending: dict[str, float] | None = None

    def on_step_end(self, trainer, state, losses) -> None:
        self._losses.append(losses["loss"])

    def on_epoch_end(self, trainer, state, metrics) -> None:
        if self.metric not in metrics and self.metric != EPOCH_LOSS:
            known = [EPOCH_LOSS, *sorted(k for k in metrics if k.count("/") == 1)]
            raise ConfigError(f"search metric {self.metric!r} is not among the metrics of an epoch: {', '.join(known)}")
        reported = clean_metrics(metrics)
        if self._losses:
            reported[EPOCH_LOSS] = sum(self._losses) / len(self._losses)
        reported[self.metric] = float(metrics.get(self.metric, reported.get(self.metric, float("nan"))))
        self._pending = {**reported, "epoch": state.epoch}
        self._losses = []

    def on_checkpoint(self, trainer, state, path: Path, kind: str) -> None:
        if kind != "epoch" or self._pending is None:
            return
        # A hard link beside the checkpoint (same file system): Tune copies it to its storage.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix="report-") as directory:
            os.link(path, Path(directory) / CHECKPOINT_FILE)
            tune.report(self._pending, checkpoint=tune.Checkpoint.from_directory(directory))
        self._pending = None


# ---------------------------------------------------------------------------------------------
# the driver: MLflow runs and progress
# ---------------------------------------------------------------------------------------------


class _TrialRunLogger(MLflowLoggerCallback):
    """Ray's MLflow logger with the trial's id on its run, so that a trial a restored search
    continues keeps its run; each report is one batch, without Ray's bookkeeping as metrics.

    Ray registers a reported checkpoint in a second step after the result; a search interrupted
    in between restores the trial from the checkpoint before, and the trial reports that epoch
    again, with the same numbers (resuming is exact). The run keeps the first.
    """

    def setup(self, *args, **kwargs) -> None:
        super().setup(*args, **kwargs)
        self._logged_epochs: dict[object, int] = {}

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            existing = mlflow.MlflowClient(self.tracking_uri).search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{self.tags['mlflow.parentRunId']}' "
                              f"and tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'", max_results=1)
            if existing:
                self._trial_runs[trial] = existing[0].info.run_id
                self._logged_epochs[trial] = int(existing[0].data.metrics.get("epoch", 0))
            else:
                self._trial_runs[trial] = self.mlflow_util.start_run(
                    run_name=str(trial), tags={**self.tags, TRIAL_ID_TAG: trial.trial_id}).info.run_id
        self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=trial.config)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        # Ray's logger writes metric by metric (about a second per report on SQLite) and includes
        # its bookkeeping (pid, host, timestamps, the config again); the epoch is the step.
        step = int(result.get("epoch", result[TRAINING_ITERATION]))
        if step <= self._logged_epochs.get(trial, 0):
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in result.items()
                   if (key not in AUTO_RESULT_KEYS or key == TIME_TOTAL_S)
                   and isinstance(value, (int, float)) and not isinstance(value, bool)]
        mlflow.MlflowClient(self.tracking_uri).log_batch(self._trial_runs[trial], metrics=metrics)
        self._logged_epochs[trial] = step


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
