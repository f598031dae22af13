"""MLflow tracking of training runs. Below this layer nothing imports mlflow (an import-linter
contract in pyproject.toml); the search records its sweep in ``detr.search.runs``.

Default store: ``sqlite:///mlflow.db`` in the working directory; ``MLFLOW_TRACKING_URI`` (or
``tracking.tracking_uri`` in the config) points elsewhere, e.g. an ``mlflow server``. Under
``mlflow run`` the environment carries ``MLFLOW_RUN_ID`` and ``start_run`` attaches to that run.
Only rank 0 logs. A resumed training continues the run its checkpoint names, each (metric, step)
logged once (``detr.tracking.continuation``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import mlflow
import numpy as np

from detr.engine.callbacks import Callback
from detr.tracking.continuation import REPLAY_MISMATCH_TAG, RunContinuation, prepare_continuation

if TYPE_CHECKING:
    from detr.data.dataset import DetectionDataset
    from detr.engine.state import TrainingState
    from detr.engine.trainer import Trainer

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class LoggedModel(Protocol):
    serving_uri: str  # models:/<name>@<alias> when registered with an alias, else the logged model's URI


class ModelLogger(Protocol):
    """Logs a checkpoint as the active run's pyfunc model, registered under ``registered_name`` with
    ``alias`` when given. The serve side provides it (``deploy.packaging.log_detr_model``): training
    is handed it by the config boundary and never imports ``deploy``."""

    def __call__(self, checkpoint: str | Path, *, registered_name: str | None = None,
                 alias: str | None = None) -> LoggedModel: ...


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else SQLite in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def use_tracking_uri(configured: str | None = None) -> str:
    """Point this process's MLflow client at the resolved tracking URI (and keep telemetry off)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = resolve_tracking_uri(configured)
    mlflow.set_tracking_uri(uri)
    return uri


@contextmanager
def tracked_run(
    *,
    tracking_uri: str | None,
    experiment: str,
    run_name: str | None = None,
    log_system_metrics: bool = True,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start a run (or reopen ``run_id``, or attach to the run ``mlflow run`` started); end it as
    FINISHED, KILLED (Ctrl-C, or an error with the interrupt exit code 130) or FAILED."""
    # mlflow.set_experiment also exports MLFLOW_EXPERIMENT_ID; restored afterwards so that a later
    # `mlflow run` or child process of the same program does not inherit a stale experiment.
    previous_experiment_env = os.environ.get("MLFLOW_EXPERIMENT_ID")
    use_tracking_uri(tracking_uri)
    if run_id is None and "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                           log_system_metrics=log_system_metrics, tags=dict(tags or {}))
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or getattr(e, "exit_code", None) == 130:
            status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)
        if previous_experiment_env is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous_experiment_env


def ui_command(tracking_uri: str) -> str:
    """What to run to look at runs logged to ``tracking_uri`` (a server is already browsable)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/#/experiments (the server is already running)"
    return f"{mlflow_executable()} ui --backend-store-uri {shlex.quote(tracking_uri)}"


def serve_commands(model_uri: str, *, port: int = 5000) -> list[str]:
    """What to run to serve ``model_uri`` over REST: MLflow's scoring server and this package's app,
    with this environment's executables. ``mlflow models serve --env-manager local`` starts
    ``uvicorn`` by name, so the environment's bin/ goes on PATH for it (a shell that did not activate
    the environment, e.g. after ``make demo``, would not find it)."""
    bin_dir = Path(sys.executable).parent
    try:
        shown = f"$PWD/{bin_dir.relative_to(Path.cwd())}"
    except ValueError:
        shown = str(bin_dir)
    detr = bin_dir / "detr"
    detr_command = _relative_to_cwd(detr) if detr.is_file() else "detr"
    quoted = shlex.quote(model_uri)
    return [f'PATH="{shown}:$PATH" {mlflow_executable()} models serve -m {quoted} --env-manager local --port {port}',
            f"{detr_command} serve {quoted} --port {port + 1}"]


def _relative_to_cwd(path: Path) -> str:
    try:
        return shlex.quote(str(path.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


def mlflow_executable() -> str:
    """The ``mlflow`` installed next to this Python (e.g. ``.venv/bin/mlflow``, relative to the
    working directory when inside it), so the printed command runs without activating anything."""
    candidate = Path(sys.executable).parent / "mlflow"
    return _relative_to_cwd(candidate) if candidate.is_file() else "mlflow"


def log_evaluation_to_project_run(metrics: Mapping[str, float], *, checkpoint: str | Path, split: str) -> str | None:
    """Log ``detr evaluate``'s metrics to the run ``mlflow run -e evaluate`` started.

    Only when ``MLFLOW_RUN_ID`` is set (``mlflow run`` exports it); returns that run's id, else None
    and nothing is logged. NaN metrics (e.g. an AP over a size range without objects) are left out,
    as in training.
    """
    if not os.environ.get("MLFLOW_RUN_ID"):
        return None
    with tracked_run(tracking_uri=None, experiment="mlflow-detr", log_system_metrics=False) as run:
        mlflow.log_metrics(clean_metrics(metrics))
        mlflow.set_tags({"evaluated_checkpoint": str(Path(checkpoint).resolve()), "evaluated_split": split})
    return run.info.run_id


def log_evaluation_to_run(
    metrics: Mapping[str, float], run_id: str, *, checkpoint: str | Path, split: str, tracking_uri: str | None = None
) -> None:
    """Add ``detr evaluate``'s metrics to an existing run (e.g. the training run of the checkpoint)
    as ``evaluate/<split>/<metric>``, next to the per-epoch numbers training logged there.

    Raises :class:`InvalidInputError` when the store has no such run.
    """
    from mlflow.exceptions import MlflowException

    from detr.errors import InvalidInputError

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    try:
        client.get_run(run_id)
    except MlflowException as error:
        raise InvalidInputError(
            f"--mlflow-run {run_id}: no such run in the tracking store {client.tracking_uri} "
            f"(set MLFLOW_TRACKING_URI to the store training logged to): {error.message}"
        ) from None
    prefix = f"evaluate/{split}/"
    now_ms = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(prefix + k, v, now_ms, 0)
                                      for k, v in clean_metrics(metrics).items()])
    client.set_tag(run_id, f"evaluated_checkpoint.{split}", str(Path(checkpoint).resolve()))


def log_diagnostic_report(report: Any, run_id: str, *, artifact_dir: str = "diagnostics", metric_prefix: str = "",
                          log_metrics: bool = True, tracking_uri: str | None = None,
                          continuation: RunContinuation | None = None) -> None:
    """Log a :class:`detr.engine.diagnostics.DiagnosticReport` to a run: its metrics (with
    ``metric_prefix``, unless ``log_metrics`` is false; those not logged yet when continuing a run),
    and under ``artifact_dir`` the confusion matrix and TIDE charts (PNG), their JSON, the per-class
    and worst-image tables, the summary text and the worst images drawn."""
    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    now_ms = int(time.time() * 1000)
    metrics = clean_metrics({metric_prefix + k: v for k, v in report.metrics().items()}) if log_metrics else {}
    if continuation is not None:
        metrics = continuation.fresh(metrics, 0)
    items = list(metrics.items())
    for i in range(0, len(items), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, now_ms, 0) for k, v in items[i : i + 1000]])
    for name, figure in report.figures().items():
        client.log_figure(run_id, figure, f"{artifact_dir}/{name}")
    for name, data in report.dicts().items():
        client.log_dict(run_id, data, f"{artifact_dir}/{name}")
    for name, table in report.tables().items():
        client.log_table(run_id, table, f"{artifact_dir}/{name}")
    client.log_text(run_id, report.summary() + "\n", f"{artifact_dir}/summary.txt")
    for name, image in report.worst_images:
        client.log_image(run_id, image, artifact_file=f"{artifact_dir}/worst_images/{name}")


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits, ``_ - . : /`` and spaces in metric names; class names in
    per-class metrics may hold anything else, which becomes ``_``."""
    return re.sub(r"[^\w\-.:/ ]", "_", name)


def clean_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics with MLflow-safe names; NaN (undefined, e.g. no objects of a size range) is left out."""
    return {metric_key(k): float(v) for k, v in metrics.items() if v == v}


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (logged as their JSON text)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def dataset_digest(dataset: DetectionDataset) -> str:
    """A content digest of the annotations (not the pixels): ids, sizes, boxes, labels, classes."""
    h = hashlib.sha256()
    h.update(json.dumps(list(dataset.label_map.names)).encode())
    for record in dataset.records:
        h.update(f"{record.image_id}|{record.width}|{record.height}|".encode())
        h.update(record.boxes.tobytes())
        h.update(record.labels.tobytes())
    return h.hexdigest()[:16]


def log_dataset(
    dataset: DetectionDataset, context: str, sources: Sequence[str | Path], stride: int | None = None,
    continuation: RunContinuation | None = None,
) -> None:
    """Record a dataset as a run input: its name, annotation digest and where it was read from;
    and its health (detr.data.health) for a model of finest output ``stride``: text, plot, counts
    (the counts not logged yet when continuing a run)."""
    from detr.data.health import DEFAULT_STRIDE, compute_health, plot_health

    health = compute_health(dataset, stride=stride or DEFAULT_STRIDE)
    mlflow.log_text(health.format() + "\n", f"data/{context}_health.txt")
    mlflow.log_figure(plot_health(health), f"data/{context}_health.png")
    counts = {f"data/{context}/{k}": v for k, v in health.metrics().items()}
    mlflow.log_metrics(continuation.fresh(counts, 0) if continuation is not None else counts)
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uris = [str(Path(s).resolve()) for s in sources]
    with warnings.catch_warnings():
        # Local paths match two registered source types; MLflow warns and picks the local one.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uris[0])
    mlflow.log_input(
        MetaDataset(source, name=dataset.name, digest=dataset_digest(dataset)),
        context=context,
        tags={"sources": json.dumps(uris), "format": dataset.format, "images": str(len(dataset))},
    )


class MlflowCallback(Callback):
    """Logs a training run: params, losses, evaluation, plots, overlays and checkpoints.

    Args:
        config: the resolved config as a JSON-able dict (logged flattened as params and as a file).
        label_map: the label map dict (logged as ``label_map.json``).
        datasets: context ("training", "validation") -> (dataset, the paths it was read from),
            logged as run inputs with an annotation digest.
        tags: extra run tags (model variant, deformable-attention backend, ...).
        overlays: returns (name, HxWx3 uint8 image) pairs of predictions drawn on a few validation
            images for the current model; called after each evaluation.
        pr_curves: returns a matplotlib Figure of the latest evaluation's PR curves (or None).
        diagnostics: returns the latest evaluation's ``DiagnosticReport`` (or None); logged under
            ``diagnostics/`` when training finishes (the evaluation of the final epoch).
        log_every_steps: step losses are logged every this many optimizer steps.
        served_model: (registered name or None, alias) to log the finished run's best checkpoint
            as its pyfunc model "model" (and register it under the name); None: no model.
        log_model: what logs that model (needed with ``served_model``).
        continuation: when resuming the run the checkpoint names (``prepare_continuation``):
            only the (metric, step) pairs not in the run yet are logged, and the resume is tagged.

    Attributes:
        logged_model: the served model logged when training finished.
    """

    def __init__(
        self,
        *,
        config: Mapping[str, Any],
        label_map: Mapping[str, Any],
        datasets: Mapping[str, tuple[DetectionDataset, Sequence[str | Path]]] = {},
        tags: Mapping[str, str] = {},
        overlays: Callable[[], list[tuple[str, np.ndarray]]] | None = None,
        pr_curves: Callable[[], Any] | None = None,
        diagnostics: Callable[[], Any] | None = None,
        log_every_steps: int = 10,
        served_model: tuple[str | None, str] | None = None,
        log_model: ModelLogger | None = None,
        continuation: RunContinuation | None = None,
    ) -> None:
        if served_model is not None and log_model is None:
            raise ValueError("served_model needs log_model, the function that logs the model")
        self.config = dict(config)
        self.served_model = served_model
        self.log_model = log_model
        self.logged_model = None
        self.label_map = dict(label_map)
        self.datasets = dict(datasets)
        self.tags = dict(tags)
        self.overlays = overlays
        self.pr_curves = pr_curves
        self.diagnostics = diagnostics
        self.log_every_steps = max(1, log_every_steps)
        self.continuation = continuation
        self.loss_history: dict[str, list[tuple[int, float]]] = {}

    def on_train_start(self, trainer: Trainer, state: TrainingState) -> None:
        if not trainer.is_main:
            return
        params = flatten(self.config)
        # A continued run already has its params (MLflow refuses to change them); a resume into a
        # new run (the checkpoint's run is gone, or it named none) has none yet.
        if state.step == 0 or not mlflow.get_run(mlflow.active_run().info.run_id).data.params:
            for i in range(0, len(params), 100):
                mlflow.log_params(dict(list(params.items())[i : i + 100]))
        commit = git_commit()
        resume_tags = self.continuation.tags() if self.continuation is not None else {}
        mlflow.set_tags({**self.tags, **({"git_commit": commit} if commit else {}), **resume_tags})
        mlflow.log_dict(self.config, "config/resolved_config.json")
        mlflow.log_dict(self.label_map, "label_map.json")
        # The finest feature-map stride of the model (its backbone's), for the small-box check.
        strides = [min(m.strides) for m in trainer.model.modules() if getattr(m, "strides", None)]
        for context, (dataset, sources) in self.datasets.items():
            log_dataset(dataset, context, sources, stride=min(strides) if strides else None,
                        continuation=self.continuation)

    def _log_metrics(self, metrics: Mapping[str, float], step: int) -> dict[str, float]:
        """Log ``metrics`` at ``step``, leaving out those a continued run has there already;
        returns what was logged."""
        if self.continuation is not None:
            metrics = self.continuation.fresh(metrics, step)
        if metrics:
            mlflow.log_metrics(dict(metrics), step=step)
        return dict(metrics)

    def on_step_end(self, trainer: Trainer, state: TrainingState, losses: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        for name in ("loss", *sorted(k for k in losses if k.startswith("loss_") and "_" not in k[5:])):
            if name in losses:
                self.loss_history.setdefault(name, []).append((state.step, losses[name]))
        if state.step == 1 or state.step % self.log_every_steps == 0:
            self._log_metrics(clean_metrics({f"train/{k}": v for k, v in losses.items()}), state.step)

    def on_epoch_end(self, trainer: Trainer, state: TrainingState, metrics: dict[str, float]) -> None:
        if not trainer.is_main:
            return
        logged = self._log_metrics({**clean_metrics(metrics), "epoch": float(state.epoch)}, state.step)
        if self.loss_history:
            mlflow.log_figure(plot_loss_curves(self.loss_history), "plots/loss_curves.png")
        if "epoch" not in logged:
            return  # an epoch end replayed after a resume: its plots and images are in the run already
        if metrics and self.pr_curves is not None:
            figure = self.pr_curves()
            if figure is not None:
                mlflow.log_figure(figure, f"plots/pr_curves_epoch{state.epoch:03d}.png")
        if metrics and self.overlays is not None:
            for name, image in self.overlays():
                mlflow.log_image(image, key=f"predictions/{name}", step=state.epoch)

    def on_checkpoint(self, trainer: Trainer, state: TrainingState, path: Path, kind: str) -> None:
        if trainer.is_main and kind == "best":
            mlflow.log_artifact(str(path), artifact_path="checkpoints")

    def on_train_end(self, trainer: Trainer, state: TrainingState, status: str) -> None:
        if not trainer.is_main:
            return
        if trainer.last_checkpoint is not None and trainer.last_checkpoint.exists():
            # Logged as checkpoints/last.pt whatever its step number, so consumers find it by name.
            with tempfile.TemporaryDirectory() as tmp:
                last = shutil.copyfile(trainer.last_checkpoint, Path(tmp) / "last.pt")
                mlflow.log_artifact(str(last), artifact_path="checkpoints")
        mlflow.set_tag("training_status", status)
        if self.continuation is not None:
            mlflow.set_tag(REPLAY_MISMATCH_TAG, str(self.continuation.replay_mismatches))
        if status == "finished" and self.diagnostics is not None:
            report = self.diagnostics()
            if report is not None:
                log_diagnostic_report(report, mlflow.active_run().info.run_id, tracking_uri=mlflow.get_tracking_uri(),
                                      continuation=self.continuation)
        if status == "finished" and self.served_model is not None:
            self._log_served_model(trainer)

    def _log_served_model(self, trainer: Trainer) -> None:
        best = trainer.checkpoints.best_path if trainer.checkpoints is not None else None
        checkpoint = best if best is not None and best.is_file() else trainer.last_checkpoint
        if checkpoint is None or not checkpoint.is_file():
            return
        name, alias = self.served_model
        self.logged_model = self.log_model(checkpoint, registered_name=name, alias=alias if name else None)
        mlflow.set_tags({"served_model_uri": self.logged_model.serving_uri,
                         "served_checkpoint": checkpoint.name})


def plot_loss_curves(history: Mapping[str, list[tuple[int, float]]]):
    # A Figure on its own Agg canvas, not pyplot: switching pyplot's backend here (matplotlib.use)
    # would stop a notebook that trains from showing its own plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    for name, points in sorted(history.items()):
        steps, values = zip(*points)
        axis.plot(steps, values, label=name, linewidth=1.2 if name == "loss" else 0.8)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (weighted total and terms)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
