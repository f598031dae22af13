"""A search trial, run by Ray in a worker: the trial's config, its training, its reports to Tune.

After every epoch the trial reports its metrics together with that epoch's checkpoint, so ASHA can
stop a trial that falls behind at a rung, and a restored search continues each unfinished trial
exactly from its last checkpoint. Trials train with ``track=False``: only the driver writes to
MLflow (a SQLite store takes one writer at a time, and trials on other machines could not reach a
local file anyway).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray import tune

from detr.config import Config, config_from_dict, set_dotted
from detr.engine.callbacks import Callback
from detr.errors import ConfigError
from detr.run import train_from_config
from detr.tracking import clean_metrics

CHECKPOINT_FILE = "checkpoint.pt"  # the one file in every checkpoint a trial reports
EPOCH_LOSS = "train/loss_mean"  # mean training loss of the epoch, reported next to the evaluation
# The epoch's report, kept in the epoch's checkpoint (the trainer's extra state): a trial continued
# from that checkpoint can hand it on when the report itself never reached the search's driver.
EPOCH_REPORT = "epoch_report"
# Prefix, in a report, of the report of the epoch the trial continued from (detr.search.trial_runs).
RESTORED_PREFIX = "restored/"
WHERE_PREFIX = "worker/"  # the node and process a report came from: in Ray's results, not metrics


@contextmanager
def scratch_directory(name: str) -> Iterator[str]:
    """One directory for the scratch checkpoints of all trials on this machine, deleted at the end
    (Ray stops a finished trial right after its last report, before it could clean up)."""
    path = tempfile.mkdtemp(prefix=f"detr-tune-{name}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def train_trial(sampled: dict[str, Any], *, base_config: dict, fixed: dict[str, Any], metric: str,
                root: str, scratch_root: str | None) -> None:
    """Ray Tune's trainable: the base config plus the fixed and sampled values, trained from the
    last checkpoint Tune restored (if any), reporting after every epoch."""
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
    config = trial_config(base_config, overrides, root=Path(root), source=f"trial {context.get_trial_name()}")
    try:
        train_from_config(config, resume=resume, callbacks=[ReportEachEpoch(metric)], track=False, progress=False)
    finally:
        # Reached when the trial fails or ends between reports; Ray never deletes its session
        # directories (/tmp/ray), where a cluster trial's scratch lives.
        shutil.rmtree(scratch, ignore_errors=True)


def trial_config(base_config: Mapping[str, Any], overrides: Mapping[str, Any], *, root: Path, source: str) -> Config:
    """The base config (a resolved config's dict) with the trial's dotted overrides, and relative
    dataset and backbone-weight paths made absolute against ``root``, the directory the search
    started from (the trial's working directory is another); validated once."""
    raw = set_dotted(copy.deepcopy(dict(base_config)), overrides, source=source)
    for split in ("train", "val"):
        for spec in (raw["data"].get(split) or {}).get("sources", []):
            if isinstance(spec, dict) and spec.get("path") is not None:
                spec["path"] = str(root / spec["path"])
    backbone = raw["model"].get("backbone") or {}
    if backbone.get("weights"):
        backbone["weights"] = str(root / backbone["weights"])
    return config_from_dict(raw, source=source)


def where_this_runs() -> dict[str, Any]:
    """The node and process of this worker, in its reports: which node a trial ran on, which process
    to look at (``worker/`` keys are not logged as metrics)."""
    return {f"{WHERE_PREFIX}node_id": ray.get_runtime_context().get_node_id(), f"{WHERE_PREFIX}pid": os.getpid()}


def report_to_tune(metrics: dict[str, Any], checkpoint_directory: str | None) -> None:
    checkpoint = tune.Checkpoint.from_directory(checkpoint_directory) if checkpoint_directory else None
    tune.report(metrics, checkpoint=checkpoint)


class ReportEachEpoch(Callback):
    """A report once per epoch: the evaluation, the epoch's mean loss and its checkpoint, through
    ``report(metrics, checkpoint_directory)`` (``tune.report`` for a one-process trial,
    ``ray.train.report`` in each worker of a multi-worker trial).

    The trainer emits ``on_epoch_end`` before it writes the epoch checkpoint, so the metrics wait
    for ``on_checkpoint``. Under data parallel only rank 0 writes checkpoints; the other ranks report
    their epoch without one (Ray Train needs every worker to report each time). The metric is
    reported every epoch, NaN when undefined: Tune ranks the kept checkpoints by it, and one without
    it would count as the newest best.
    """

    def __init__(self, metric: str, report: Callable[[dict[str, Any], str | None], None] = report_to_tune) -> None:
        self.metric = metric
        self.report = report
        self._losses: list[float] = []
        self._pending: dict[str, float] | None = None

    def on_step_end(self, trainer, state, losses) -> None:
        self._losses.append(losses["loss"])

    def on_epoch_end(self, trainer, state, metrics) -> None:
        if trainer.is_main and self.metric not in metrics and self.metric != EPOCH_LOSS:
            known = [EPOCH_LOSS, *sorted(k for k in metrics if k.count("/") == 1)]
            raise ConfigError(f"search metric {self.metric!r} is not among the metrics of an epoch: {', '.join(known)}")
        reported = clean_metrics(metrics)
        if self._losses:
            reported[EPOCH_LOSS] = sum(self._losses) / len(self._losses)
        reported[self.metric] = float(metrics.get(self.metric, reported.get(self.metric, float("nan"))))
        self._pending = {**reported, "epoch": state.epoch, **where_this_runs()}
        trainer.extra_state[EPOCH_REPORT] = {k: v for k, v in self._pending.items()
                                             if isinstance(v, (int, float)) and not k.startswith(WHERE_PREFIX)}
        self._losses = []
        if not trainer.is_main:
            self.report(self._pending, None)
            self._pending = None

    def on_checkpoint(self, trainer, state, path: Path, kind: str) -> None:
        if kind != "epoch" or self._pending is None:
            return
        # A hard link beside the checkpoint (same file system): Ray copies it to its storage.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix="report-") as directory:
            os.link(path, Path(directory) / CHECKPOINT_FILE)
            self.report(self._pending, directory)
        self._pending = None
