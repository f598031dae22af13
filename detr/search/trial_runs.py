"""The trials' MLflow runs: one child run of the sweep run per trial, logged by the driver through
Ray's ``MLflowLoggerCallback`` (tag ``mlflow.parentRunId``) with the trial's sampled params and
per-epoch metrics. With ``detr.search.runs`` the only modules of the search that call mlflow.
"""

from __future__ import annotations

import time

import mlflow
from mlflow.entities import Metric
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, TIME_TOTAL_S, TRAINING_ITERATION

from detr.search.runs import RESTARTS, TRIAL_ID_TAG
from detr.search.trial import RESTORED_PREFIX, WHERE_PREFIX


def trial_run_logger(sweep_run_id: str) -> TrialRunLogger:
    """The logger of the trials of the sweep run ``sweep_run_id``: their runs go into its experiment,
    in the tracking store this process uses."""
    experiment = mlflow.get_experiment(mlflow.get_run(sweep_run_id).info.experiment_id)
    return TrialRunLogger(tracking_uri=mlflow.get_tracking_uri(), experiment_name=experiment.name,
                          tags={"mlflow.parentRunId": sweep_run_id}, save_artifact=False)


class TrialRunLogger(MLflowLoggerCallback):
    """Ray's MLflow logger with the trial's id on its run, so that a trial a restored search
    continues keeps its run; each report is one batch, without Ray's bookkeeping as metrics.

    Ray registers a reported checkpoint in a second step after the result; a search interrupted
    in between restores the trial from the checkpoint before, and the trial reports that epoch
    again, with the same numbers (resuming is exact). The run keeps the first.

    A multi-worker trial continues from the newest checkpoint of its own Ray Train run, whose report
    can be the one an interruption kept from this logger; its first report then carries that epoch's
    report under ``restored/`` keys, logged here at its epoch unless it was logged already.
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
        restored = {k.removeprefix(RESTORED_PREFIX): v for k, v in result.items() if k.startswith(RESTORED_PREFIX)}
        if "epoch" in restored:
            self._log_epoch(trial, int(restored["epoch"]), restored)
        self._log_epoch(trial, int(result.get("epoch", result[TRAINING_ITERATION])),
                        {k: v for k, v in result.items() if not k.startswith(RESTORED_PREFIX)})

    def _log_epoch(self, trial, step: int, result: dict) -> None:
        if step <= self._logged_epochs.get(trial, 0):
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in result.items()
                   if (key not in AUTO_RESULT_KEYS or key == TIME_TOTAL_S) and not key.startswith(WHERE_PREFIX)
                   and isinstance(value, (int, float)) and not isinstance(value, bool)]
        mlflow.MlflowClient(self.tracking_uri).log_batch(self._trial_runs[trial], metrics=metrics)
        self._logged_epochs[trial] = step

    def log_trial_end(self, trial, failed: bool = False) -> None:
        # A one-process trial that Tune restarted after a failure counts it in num_failures; a
        # multi-worker trial reports its workers' restarts itself (RESTARTS, logged with each epoch).
        last = trial.last_result or {}
        restarts = int(trial.num_failures) + int(last.get(RESTARTS, 0))
        if restarts or RESTARTS not in last:
            step = int(last.get("epoch", last.get(TRAINING_ITERATION, 0)))
            mlflow.MlflowClient(self.tracking_uri).log_metric(self._trial_runs[trial], RESTARTS, float(restarts),
                                                              step=step)
        super().log_trial_end(trial, failed)
