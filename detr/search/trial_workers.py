"""A search trial on several Ray Train workers (``detr tune --workers-per-trial N``), the way Ray
documents Tune with Train: the Tune trial is a small driver that runs a ``TorchTrainer``; the
trainer's workers run the trial's ``train_from_config`` under data parallel (``detr.search.ray_train``
says how), and each epoch's report goes from the workers through the trainer to Tune, so that ASHA
compares and stops these trials as it does one-process trials.

Faults: Ray Train restarts the workers of a trial whose worker died (``FailureConfig(max_failures)``)
from the trial's last reported checkpoint, and the training continues exactly (the checkpoint holds
every RNG and the sampler's position). The trial's driver counts the restarts and reports them with
every epoch as ``trial/restarts``. Ray Train keeps the trial's checkpoints in its own run, named
after the trial in the search's storage: a restored search starts the trial's trainer again under
that name, and Ray Train continues it from the newest checkpoint there. That checkpoint's report
may never have reached the search's driver (it was on its way when the search was interrupted), so
the first report after a restore carries it along (``restored/`` keys, from the checkpoint), and
the driver logs it if it has not already (``detr.search.trial_runs``); a trial restored from its
last epoch's checkpoint has nothing left to train and reports that epoch again instead.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from detr.run import train_from_config
from detr.search.runs import RESTARTS  # reported with every epoch of a multi-worker trial: its restarts so far
from detr.search.ray_train import WorkerGroup, enter_launch_directory, worker_error
from detr.checkpoints.format import load_checkpoint
from detr.search.trial import (
    CHECKPOINT_FILE,
    EPOCH_REPORT,
    RESTORED_PREFIX,
    WHERE_PREFIX,
    ReportEachEpoch,
    trial_config,
)

PLACEMENT_GROUP = f"{WHERE_PREFIX}placement_group"  # in each report: the placement group of the trial's workers
TRAIN_RUNS = "train_runs"  # the folder of the search's storage that holds Ray Train's runs, one per trial


def train_trial_on_workers(sampled: dict[str, Any], *, base_config: dict, fixed: dict[str, Any], metric: str,
                           mode: str, root: str, scratch_root: str | None, workers: dict[str, float],
                           max_failures: int, train_storage: str) -> None:
    """Ray Tune's trainable for a multi-worker trial: a ``TorchTrainer`` of ``workers`` (a
    ``WorkerGroup``'s fields), its reports forwarded to Tune."""
    context = tune.get_context()
    group = WorkerGroup(**workers)
    trainer = TorchTrainer(
        _trial_worker,
        train_loop_config={"sampled": sampled, "base_config": base_config, "fixed": fixed, "metric": metric,
                           "root": root, "scratch_root": scratch_root, "trial_id": context.get_trial_id(),
                           "trial_name": context.get_trial_name()},
        scaling_config=group.scaling_config(),
        run_config=ray.train.RunConfig(
            name=context.get_trial_name(), storage_path=train_storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # The best checkpoints by the metric, and always the latest (to continue from).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=metric,
                                                         checkpoint_score_order=mode),
            callbacks=[_ReportToTune()],
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"the trial's workers failed {max_failures + 1} times; the last: {worker_error(e)}") \
            from None


class _ReportToTune(TuneReportCallback):
    """Ray's forwarding of the workers' reports to Tune, with the number of worker-group restarts.

    Runs in the trainer's controller, which outlives the workers it restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.restarts = 0

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.restarts += 1  # the controller restarts the group (or gives up) after each failure it sees

    def after_report(self, run_context, metrics, checkpoint) -> None:
        super().after_report(run_context, [{**metrics[0], RESTARTS: self.restarts}, *metrics[1:]], checkpoint)


def _trial_worker(loop_config: dict[str, Any]) -> None:
    """One worker of a multi-worker trial: the trial's config, trained from the trial's last
    checkpoint (after a restart or a restored search), reporting each epoch to Ray Train."""
    enter_launch_directory(loop_config["root"])
    rank = ray.train.get_context().get_world_rank()
    scratch_root = loop_config["scratch_root"]
    base = Path(scratch_root) if scratch_root and Path(scratch_root).is_dir() else Path(tempfile.gettempdir())
    # The trainer's own checkpoints are scratch (the ones that count are those reported); whatever an
    # earlier attempt of this worker left goes.
    scratch = base / "workers" / loop_config["trial_id"] / f"rank-{rank}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    resume = None
    restored_report: dict[str, Any] = {}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            resume = Path(shutil.copy2(Path(directory) / CHECKPOINT_FILE, scratch / "restored.pt"))
        if rank == 0:  # Tune gets rank 0's reports only
            restored_report = load_checkpoint(resume).get(EPOCH_REPORT) or {}
    overrides = {**loop_config["fixed"], **loop_config["sampled"], "train.checkpoint.dir": str(scratch),
                 "train.checkpoint.keep_last": 1}
    config = trial_config(loop_config["base_config"], overrides, root=Path(loop_config["root"]),
                          source=f"trial {loop_config['trial_name']}")
    try:
        report = _ReportToTrain({f"{RESTORED_PREFIX}{k}": v for k, v in restored_report.items()})
        train_from_config(config, resume=resume, callbacks=[ReportEachEpoch(loop_config["metric"], report)],
                          track=False, progress=False)
        if restored is not None and not report.made:
            # The trial continued from its last epoch's checkpoint, whose report an interruption kept
            # from the driver: nothing was left to train, and that epoch is reported again (every rank
            # reports; Tune takes rank 0's), so that the driver logs it and the trial ends with it.
            report.again(restored_report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _ReportToTrain:
    """``ray.train.report`` of an epoch; the first one after a restore also carries ``restored``,
    the report of the epoch the trial continued from (``restored/`` keys)."""

    def __init__(self, restored: dict[str, Any]) -> None:
        self.restored = restored
        self.made = False  # whether an epoch was reported

    def __call__(self, metrics: dict[str, Any], checkpoint_directory: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_directory) if checkpoint_directory else None
        ray.train.report({**metrics, **self.restored, PLACEMENT_GROUP: _placement_group()}, checkpoint=checkpoint)
        self.restored = {}
        self.made = True

    def again(self, report: dict[str, Any]) -> None:
        """The report of the epoch the trial continued from, as it was, without a new checkpoint."""
        ray.train.report({**report, PLACEMENT_GROUP: _placement_group()})
        self.restored = {}
        self.made = True


def _placement_group() -> str | None:
    placement_group = ray.util.get_current_placement_group()
    return placement_group.id.hex() if placement_group else None


class ReleaseWorkerResources(tune.Callback):
    """Frees the resources of a trial's workers when Tune ends the trial.

    Tune ends a trial (ASHA stops it, or it reached its last epoch) by stopping its driver, often
    before the driver's TorchTrainer has shut its workers down. Their placement group outlives them
    (it belongs to the search's process), and Ray Train's own clean-up of it needs the dashboard's
    state API, which a small Ray has not: without this, the next trial would wait for CPUs that
    nobody uses. Each report names the placement group of the trial's workers.
    """

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._release(trial)

    @staticmethod
    def _release(trial) -> None:
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        group_id = (trial.last_result or {}).get(PLACEMENT_GROUP)
        if not group_id:
            return
        group = PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)


def best_reported_checkpoint(result, metric: str, mode: str) -> ray.train.Checkpoint | None:
    """The checkpoint of a multi-worker trial's best epoch: Tune saw its path in the reports (Ray
    Train keeps the best ones by the metric, and the latest)."""
    frame = result.metrics_dataframe
    if frame is None or CHECKPOINT_PATH_KEY not in frame or metric not in frame:
        return None
    rows = [(value, path) for value, path in zip(frame[metric], frame[CHECKPOINT_PATH_KEY])
            if isinstance(path, str) and not math.isnan(value)]
    if not rows:
        return None
    value, path = (max if mode == "max" else min)(rows, key=lambda row: row[0])
    return ray.train.Checkpoint(path)
