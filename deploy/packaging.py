"""A checkpoint -> a self-contained MLflow pyfunc model, optionally registered under an alias.

The logged model holds everything it needs to load without the training tree: the inference
weights (EMA weights when training kept them; no optimizer state), the resolved config and label
map (inside that slim checkpoint), the code of the ``detr`` and ``deploy`` packages
(``code_paths``), pinned requirements, a signature with the declared params, and an input example.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import deploy
import detr
from deploy.images import encode_png_base64
from deploy.pyfunc_model import CHECKPOINT_ARTIFACT, IMAGE_COLUMN
from deploy.registry import check_alias, register
from detr.checkpoints.format import load_checkpoint, save_checkpoint
from detr.checkpoints.load import inference_weights, require_model_entries
from detr.errors import CheckpointError, InvalidInputError
from detr.models.detection_params import DetectionParams

# What the model's code imports at serving time (pinned to this environment's versions).
RUNTIME_REQUIREMENTS = ("torch", "torchvision", "numpy", "scipy", "pillow", "pyyaml", "pydantic", "pandas",
                        "mlflow", "defusedxml", "pycocotools", "tqdm", "ninja")


@dataclass(frozen=True)
class LoggedDetrModel:
    model_uri: str  # models:/m-<id>
    run_id: str
    registered_name: str | None = None
    version: str | None = None
    alias: str | None = None

    @property
    def serving_uri(self) -> str:
        """``models:/<name>@<alias>`` when registered with an alias, else the logged model's URI."""
        if self.registered_name and self.alias:
            return f"models:/{self.registered_name}@{self.alias}"
        if self.registered_name and self.version:
            return f"models:/{self.registered_name}/{self.version}"
        return self.model_uri


def signature() -> ModelSignature:
    """The image column and the declared params (with the defaults a request without them gets)."""
    defaults = DetectionParams()
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        params=ParamSchema([
            ParamSpec("score_threshold", "double", defaults.score_threshold),
            ParamSpec("max_detections", "long", defaults.max_detections),
            ParamSpec("box_format", "string", defaults.box_format),
        ]),
    )


def inference_checkpoint(checkpoint: str | Path, out_path: Path) -> tuple[Path, str | None]:
    """Write the serving part of a training (or converted) checkpoint: weights, config, label map.
    EMA weights replace the model's when the checkpoint has them (they are what evaluation saw).
    Returns the file and the MLflow run that trained the checkpoint, when it recorded one."""
    data = load_checkpoint(checkpoint)
    require_model_entries(data, checkpoint)
    payload = {"model": inference_weights(data), "config": data["config"], "label_map": data["label_map"]}
    if "training_state" in data:
        payload["training_state"] = data["training_state"]
    return save_checkpoint(out_path, payload), data.get("mlflow_run_id")


def log_detr_model(
    checkpoint: str | Path,
    *,
    name: str = "model",
    registered_name: str | None = None,
    alias: str | None = None,
    run_id: str | None = None,
) -> LoggedDetrModel:
    """Log ``checkpoint`` as a pyfunc model and, with ``registered_name``, register it and point
    ``alias`` (e.g. "champion") at the new version.

    The model goes into the run ``run_id``; by default into the active run, else the training run
    the checkpoint recorded (when the tracking store has it), else a new run named "register".
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint file not found")
    if alias and not registered_name:
        raise InvalidInputError("an alias needs a registered model name (--name)")
    if alias:
        check_alias(alias)  # before anything is logged
    with tempfile.TemporaryDirectory(prefix="detr-model-") as tmp:
        weights, training_run = inference_checkpoint(checkpoint, Path(tmp) / "model.pt")
        active = mlflow.active_run()
        if run_id is None and active is not None:
            run_id = active.info.run_id
        elif run_id is None and training_run is not None and _run_exists(training_run):
            run_id = training_run
        elif run_id is not None and not _run_exists(run_id):
            raise InvalidInputError(f"run {run_id} is not in the tracking store {mlflow.get_tracking_uri()}")
        if active is not None and active.info.run_id == run_id:
            info = _log(weights, name)
        else:
            with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"):
                info = _log(weights, name)
    logged = LoggedDetrModel(model_uri=info.model_uri, run_id=info.run_id)
    if registered_name is None:
        return logged
    version = register(logged.model_uri, registered_name, alias=alias)
    return LoggedDetrModel(model_uri=logged.model_uri, run_id=logged.run_id, registered_name=registered_name,
                           version=version, alias=alias)


def _run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def _log(weights: Path, name: str):
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("served_model.py")),
        artifacts={CHECKPOINT_ARTIFACT: str(weights)},
        code_paths=[str(Path(detr.__file__).parent), str(Path(deploy.__file__).parent)],
        signature=signature(),
        input_example=_input_example(),
        pip_requirements=pinned_requirements(),
    )


def _input_example():
    import pandas as pd

    from detr.data.synth import image_rng, render_scene

    scene = render_scene(image_rng(0, 0), 160, 160)
    return pd.DataFrame({IMAGE_COLUMN: [encode_png_base64(scene.image)]})


def pinned_requirements() -> list[str]:
    requirements = []
    for package in RUNTIME_REQUIREMENTS:
        try:
            requirements.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            requirements.append(package)
    return requirements
