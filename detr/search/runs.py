"""The MLflow side of a search: the sweep run, and what it records when the search is over.

The sweep run holds the search's definition (settings, search space, base config) from the start,
and at the end the best trial's params and metric, the trial counts, a plot of every trial's metric
per epoch and the best checkpoint as the pyfunc model "model". The trials' own runs are its
children (``detr.search.trial_runs`` logs them through Ray). This module reads Ray's ``ResultGrid``
through its public attributes only and does not import ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from detr.config import Config
from detr.errors import DetrError, InvalidInputError
from detr.search.space import SearchSpace
from detr.tracking import ModelLogger, metric_key, tracked_run, use_tracking_uri

PLOT_ARTIFACT = "plots/metric_vs_epoch.png"
TRIAL_ID_TAG = "search.trial_id"  # on each child run: the Ray trial it records
SEARCH_PATH_TAG = "search.path"  # on the sweep run: the Ray experiment, found again by --resume
RESTARTS = "trial/restarts"  # on each child run: how often the trial (or its workers) restarted after a failure
RETRIES = "trials/retries"  # on the sweep run: the restarts of all its trials


class SearchInterrupted(DetrError):
    """Ctrl-C: Ray saved the search's state; ``resume=True`` (``--resume``) continues it."""

    exit_code = 130

    def __init__(self, name: str, experiment_path: str) -> None:
        super().__init__(f"search {name!r} interrupted; its state is saved in {experiment_path}: continue it "
                         f"with --resume --name {name}")


@dataclass(frozen=True)
class TrialSummary:
    name: str
    trial_id: str
    params: dict[str, Any]  # the sampled dotted overrides
    epochs: int  # epochs reported; fewer than the search's max_epochs: ASHA stopped it, or it failed
    history: tuple[tuple[int, float], ...]  # (epoch, metric) per reported epoch
    best_value: float | None  # the best metric over its epochs (None: never reported a number)
    status: str  # "finished", "stopped early" or "failed"
    error: str | None = None
    run_id: str | None = None  # the trial's MLflow run, a child of the sweep run
    restarts: int = 0  # restarts after a failure (of the trial, or of its workers)


@dataclass(frozen=True)
class SearchOutcome:
    name: str
    experiment_path: str  # Ray's state: `resume` continues from it
    metric: str
    mode: str
    max_epochs: int
    trials: tuple[TrialSummary, ...]
    best: TrialSummary
    sweep_run_id: str
    tracking_uri: str
    # The best checkpoint as a pyfunc model: models:/<name>@<alias> when registered, else models:/m-<id>.
    served_model_uri: str

    @property
    def stopped_early(self) -> list[TrialSummary]:
        return [t for t in self.trials if t.status == "stopped early"]


def resumed_sweep_run(config: Config, *, name: str, experiment_path: str, definition: dict) -> str:
    """The id of the sweep run of the search being resumed; its definition must be the one given now
    (Ray continues the search as it was started, whatever the new settings say)."""
    use_tracking_uri(config.tracking.tracking_uri)
    found = mlflow.search_runs(filter_string=f"tags.`{SEARCH_PATH_TAG}` = '{experiment_path}'",
                               search_all_experiments=True, output_format="list", max_results=1)
    if not found:
        raise InvalidInputError(f"--resume: the MLflow run of search {name!r} is not in "
                                f"{mlflow.get_tracking_uri()} (resume with the tracking store it started with)")
    started = found[0].data.params
    changed = [f"{key}={value} (it started with {started[key]})" for key, value in definition.items()
               if key in started and started[key] != str(value)]
    if changed:
        raise InvalidInputError(f"--resume: search {name!r} must continue as it started; changed: "
                                f"{'; '.join(changed)}")
    return found[0].info.run_id


@contextmanager
def sweep_run(config: Config, space: SearchSpace, *, name: str, experiment_path: str, definition: dict,
              resumed_run_id: str | None = None) -> Iterator[str]:
    """The sweep's MLflow run: started here, reopened when resuming, or the run ``mlflow run -e
    tune`` started (MLFLOW_RUN_ID). Ends as FINISHED, KILLED (interrupted) or FAILED."""
    tracking = config.tracking
    with tracked_run(tracking_uri=tracking.tracking_uri, experiment=tracking.experiment, run_name=name,
                     log_system_metrics=False, run_id=resumed_run_id) as run:
        mlflow.set_tags({SEARCH_PATH_TAG: experiment_path, "search.name": name, "search.space_file": space.source})
        if resumed_run_id is None:
            mlflow.log_params(definition)
            mlflow.log_dict(space.to_dict(), "search/search_space.yaml")
            mlflow.log_dict(config.to_dict(), "search/base_config.json")
        yield run.info.run_id


def child_runs(sweep_run_id: str) -> dict[str, mlflow.entities.Run]:
    """Trial id -> the MLflow run of that trial under the sweep run."""
    run = mlflow.get_run(sweep_run_id)
    children = mlflow.MlflowClient().search_runs([run.info.experiment_id],
                                                 filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")
    return {r.data.tags[TRIAL_ID_TAG]: r for r in children if TRIAL_ID_TAG in r.data.tags}


def summarize_trials(grid, *, metric: str, mode: str, max_epochs: int,
                     runs: Mapping[str, mlflow.entities.Run]) -> list[TrialSummary]:
    """One summary per trial of a Ray ``ResultGrid``, in trial order."""
    pick = max if mode == "max" else min
    summaries = []
    for result in grid:
        trial_name = Path(result.path).name
        trial_id = (result.metrics or {}).get("trial_id") or trial_name.removeprefix("trial_")
        frame = result.metrics_dataframe
        history: tuple[tuple[int, float], ...] = ()
        if frame is not None and metric in frame and "epoch" in frame:
            history = tuple((int(e), float(v)) for e, v in zip(frame["epoch"], frame[metric]))
        values = [v for _, v in history if not math.isnan(v)]
        epochs = int((result.metrics or {}).get("epoch", 0))
        error = _first_line(result.error) if result.error is not None else None
        status = "failed" if error else "finished" if epochs >= max_epochs else "stopped early"
        summaries.append(TrialSummary(name=trial_name, trial_id=trial_id, params=dict(result.config or {}),
                                      epochs=epochs, history=history, best_value=pick(values) if values else None,
                                      status=status, error=error,
                                      run_id=runs[trial_id].info.run_id if trial_id in runs else None,
                                      restarts=int(runs[trial_id].data.metrics.get(RESTARTS, 0))
                                      if trial_id in runs else 0))
    return sorted(summaries, key=lambda t: t.name)


def _first_line(error: BaseException) -> str:
    """The error's own message: Ray wraps a trial's exception in a traceback of the worker."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def log_search_results(trials: Sequence[TrialSummary], best: TrialSummary, *, metric: str, mode: str,
                       checkpoint: Path, register: tuple[str, str | None] | None, log_model: ModelLogger) -> str:
    """Into the active (sweep) run: the best trial's params, metric and run, the trial counts, the
    plot, and ``checkpoint`` as the pyfunc model "model" logged by ``log_model`` (registered with
    ``register=(name, alias)``). Returns the URI to serve."""
    mlflow.log_params({f"best.{key}": value for key, value in best.params.items()})
    counts = {status: sum(t.status == status for t in trials) for status in ("finished", "stopped early", "failed")}
    mlflow.log_metrics({f"best/{metric_key(metric)}": best.best_value,
                        **{f"trials/{status.replace(' ', '_')}": float(n) for status, n in counts.items()},
                       RETRIES: float(sum(t.restarts for t in trials))})
    mlflow.set_tags({"search.best_trial": best.name, **({"search.best_run_id": best.run_id} if best.run_id else {})})
    mlflow.log_figure(plot_trials(trials, metric=metric, mode=mode, best=best.name), PLOT_ARTIFACT)
    name, alias = register if register else (None, None)
    logged = log_model(checkpoint, registered_name=name, alias=alias)
    mlflow.set_tag("served_model_uri", logged.serving_uri)
    return logged.serving_uri


def plot_trials(trials: Sequence[TrialSummary], *, metric: str, mode: str, best: str):
    """The metric against the epoch for every trial: the short lines are the trials ASHA stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for trial in trials:
        if not trial.history:
            continue
        epochs, values = zip(*trial.history)
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in trial.params.items())
        is_best = trial.name == best
        axis.plot(epochs, values, marker="o", markersize=3, linewidth=2.4 if is_best else 1.0,
                  linestyle="-" if trial.status == "finished" else "--",
                  label=f"{'best: ' if is_best else ''}{trial.name} ({params})", zorder=3 if is_best else 2)
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} per epoch ({mode} is better; dashed: stopped early or failed)")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    plt.close(figure)
    return figure


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
