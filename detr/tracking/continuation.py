"""One MLflow run across resumes: a resumed training continues the run its checkpoint names.

The rule is one value per (metric key, step). A checkpoint is written every few steps, but the
killed process went on logging after it: resuming replays the steps between the checkpoint and the
kill, and those are already in the run. On resume the run's metric history is read once, and
:meth:`RunContinuation.fresh` passes on only the (key, step) pairs not logged yet, so the history
has every step exactly once, with no gap. Resume is bitwise, so a replayed value equals the logged
one; a difference beyond float rounding is counted (tag ``resume.replay_mismatches``), never
logged twice.

The run found RUNNING is the process that was killed (SIGKILL, a lost node): nothing ended it, so
it is ended KILLED here before it is reopened. Each resume adds to the tags ``resume.count`` and
``resume.history`` (a JSON list: the step resumed from, the status the run was found in and what it
was ended as). A run that is no longer in the tracking store (deleted, or another store) cannot be
continued: a new run starts, tagged ``resume.previous_run_id``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import mlflow
from mlflow.exceptions import MlflowException

RESUME_COUNT_TAG = "resume.count"
RESUME_HISTORY_TAG = "resume.history"
PREVIOUS_RUN_TAG = "resume.previous_run_id"
REPLAY_MISMATCH_TAG = "resume.replay_mismatches"

# Values are stored as float64 by every MLflow store; a bitwise replay gives equal values. The
# tolerance only forgives a store that rounds (text round trips), not a different number.
_REPLAY_REL_TOL = 1e-9


@dataclass
class RunContinuation:
    """What a resumed training needs to continue its run.

    Attributes:
        run_id: the run to reopen; None when it is gone and a new run starts.
        previous_run_id: the run the checkpoint named, when it could not be continued.
        checkpoint_step: the optimizer step of the checkpoint resumed from.
        logged: metric key -> {step: value} already in the run (and logged since, through ``fresh``).
        history: the resumes so far, this one last (the ``resume.history`` tag).
        replay_mismatches: replayed values that differed from the logged ones, over every resume.
        replayed: replayed values left out because they were logged already.
    """

    run_id: str | None
    previous_run_id: str | None
    checkpoint_step: int
    logged: dict[str, dict[int, float]] = field(default_factory=dict)
    history: list[dict[str, object]] = field(default_factory=list)
    replay_mismatches: int = 0
    replayed: int = 0

    def fresh(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        """The entries of ``metrics`` not yet logged at ``step``; they count as logged from now on."""
        new: dict[str, float] = {}
        for key, value in metrics.items():
            steps = self.logged.setdefault(key, {})
            if step not in steps:
                steps[step] = float(value)
                new[key] = float(value)
                continue
            self.replayed += 1
            if not math.isclose(steps[step], float(value), rel_tol=_REPLAY_REL_TOL, abs_tol=0.0):
                self.replay_mismatches += 1
        return new

    def tags(self) -> dict[str, str]:
        """The tags that record this resume on the run."""
        tags = {RESUME_COUNT_TAG: str(len(self.history)), RESUME_HISTORY_TAG: json.dumps(self.history)}
        if self.previous_run_id is not None:
            tags[PREVIOUS_RUN_TAG] = self.previous_run_id
        return tags


def prepare_continuation(run_id: str | None, *, checkpoint_step: int,
                         tracking_uri: str | None = None) -> RunContinuation | None:
    """Get run ``run_id`` (named by the checkpoint resumed from) ready to be reopened.

    Returns None when the checkpoint names no run (it was written untracked). Ends the run KILLED
    when it is still RUNNING; reads its metric history. ``tracking_uri``: None is the resolved
    default (``MLFLOW_TRACKING_URI``, else the local SQLite store).
    """
    from detr.tracking import resolve_tracking_uri

    if run_id is None:
        return None
    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        entry = {"step": checkpoint_step, "found": "missing" if run is None else "deleted", "ended_as": None}
        return RunContinuation(run_id=None, previous_run_id=run_id, checkpoint_step=checkpoint_step,
                               history=[entry])

    found = run.info.status
    ended_as = None
    if found == "RUNNING":
        # Nothing else ends a run whose process was killed: end it as what happened to it.
        client.set_terminated(run_id, status="KILLED")
        ended_as = "KILLED"
    try:
        history = json.loads(run.data.tags.get(RESUME_HISTORY_TAG, "[]"))
    except json.JSONDecodeError:
        history = []
    history.append({"step": checkpoint_step, "found": found, "ended_as": ended_as})
    logged = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in run.data.metrics}
    return RunContinuation(run_id=run_id, previous_run_id=None, checkpoint_step=checkpoint_step, logged=logged,
                           history=history, replay_mismatches=int(run.data.tags.get(REPLAY_MISMATCH_TAG, "0")))
