"""Fixtures of the serving tests: small checkpoints with random weights, a tracking store with a
registered model, and request images."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from detr.checkpoints.format import save_checkpoint
from detr.config import config_from_dict
from detr.data.labelmap import LabelMap
from detr.data.synth import image_rng, render_scene
from detr.models.build import build_model
from tests.models.conftest import TINY

CLASSES = ("circle", "square", "triangle")
# The served model's preprocessing: shorter side to 96 pixels, longer side at most 128.
VAL_TRANSFORMS = [{"name": "resize", "args": {"size": 96, "max_size": 128}}, {"name": "normalize"}]


def write_checkpoint(path: Path, arch_changes: dict, *, seed: int = 0) -> Path:
    config = config_from_dict({"model": {**TINY, **arch_changes}, "data": {"transforms": {"val": VAL_TRANSFORMS}}})
    torch.manual_seed(seed)
    model = build_model(config.model, len(CLASSES))
    return save_checkpoint(path, {"model": model.state_dict(), "config": config.to_dict(),
                                  "label_map": LabelMap(CLASSES).to_dict()})


@pytest.fixture(scope="session")
def detr_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "detr.pt", {"arch": "detr"})


@pytest.fixture(scope="session")
def deformable_checkpoint(tmp_path_factory) -> Path:
    changes = {"arch": "deformable_detr", "deformable": {"with_box_refine": True, "two_stage": True}}
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "deformable.pt", changes)


def scene_pixels(seed: int, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] of a generated shapes image."""
    return render_scene(image_rng(seed, 0), width, height).image


@pytest.fixture(scope="session")
def request_images() -> list[np.ndarray]:
    """Three images of different sizes and aspect ratios ([H, W, 3] uint8)."""
    return [scene_pixels(1, 160, 160), scene_pixels(2, 200, 120), scene_pixels(3, 90, 150)]


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> Iterator[str]:
    """A fresh SQLite tracking store for the session, also in MLFLOW_TRACKING_URI for child processes."""
    import mlflow

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    # Its own experiment with artifacts under the store: the Default experiment would put the logged
    # models in ./mlruns of the working directory (the checkout).
    mlflow.MlflowClient(uri).create_experiment("deploy-tests", artifact_location=str(store / "artifacts"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "deploy-tests")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        yield uri
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="session")
def registered_model(detr_checkpoint, tracking_uri):
    """The DETR checkpoint logged as a pyfunc model, registered as "shapes" with alias "champion"."""
    from deploy.packaging import log_detr_model

    return log_detr_model(detr_checkpoint, registered_name="shapes", alias="champion")


MAX_BODY_BYTES = 512 * 1024


@dataclass(frozen=True)
class Served:
    url: str
    pid: int
    log: Path


@pytest.fixture(scope="session")
def detr_server(registered_model, tmp_path_factory) -> Iterator[Served]:
    """`detr serve models:/shapes@champion` (the model from the registry, over the tracking URI), on a
    local port, once /health/ready answers; at most 4 images and 512 kB per request."""
    from tests.servers import VENV_BIN, free_port, server_process

    work = tmp_path_factory.mktemp("serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(VENV_BIN / "detr"), "serve", registered_model.serving_uri, "--port", str(port),
               "--max-body-mb", str(MAX_BODY_BYTES / 1024 / 1024), "--max-images", "4"]
    with server_process(command, ready_url=f"{url}/health/ready", log=work / "serve.log", cwd=work) as process:
        yield Served(url, process.pid, work / "serve.log")
