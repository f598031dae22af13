"""Training against a real ``mlflow server`` over HTTP, as against a team's tracking server.

The server stores runs in SQLite and serves artifacts itself (``--artifacts-destination``): the
client uploads checkpoints and plots through HTTP (``mlflow-artifacts:/`` URIs) and never touches
the server's directories, as with a remote server. The tracking URI reaches ``detr train`` only
through ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from detr.checkpoints.format import load_checkpoint
from detr.data.synth import generate_synthetic_dataset
from tests.servers import VENV_BIN, free_port, server_process


@pytest.fixture
def mlflow_server(tmp_path):
    """(url, artifacts directory) of a fresh server; stopped (with its workers) afterwards."""
    port = free_port()
    artifacts = tmp_path / "server" / "artifacts"
    artifacts.mkdir(parents=True)
    command = [str(VENV_BIN / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server' / 'db.sqlite'}",
               "--artifacts-destination", str(artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with server_process(command, ready_url=f"{url}/health", log=tmp_path / "server" / "server.log",
                        cwd=tmp_path / "server", timeout=120):
        yield url, artifacts


@pytest.mark.slow
def test_cli_training_logs_params_metrics_and_checkpoint_to_a_tracking_server(mlflow_server, tmp_path):
    url, artifacts = mlflow_server
    data = generate_synthetic_dataset(tmp_path / "synth", format="coco", num_images=8, seed=4, image_size=(96, 96),
                                      val_fraction=0.25, progress=False)
    checkpoints = tmp_path / "checkpoints"
    overrides = {
        "data.train": f"{{sources: [{{path: {data}, format: coco, split: train}}]}}",
        "data.val": f"{{sources: [{{path: {data}, format: coco, split: val}}]}}",
        "data.transforms.train": "[{name: resize, args: {size: 64, max_size: 80}}, {name: normalize}]",
        "data.transforms.val": "[{name: resize, args: {size: 64, max_size: 80}}, {name: normalize}]",
        "model.backbone.name": "resnet18",
        "model.backbone.trainable_layers": 0,
        "model.hidden_dim": 32,
        "model.nheads": 4,
        "model.enc_layers": 1,
        "model.dec_layers": 1,
        "model.dim_feedforward": 64,
        "model.num_queries": 6,
        "train.batch_size": 3,
        "train.epochs": 1,
        "train.device": "cpu",
        "train.checkpoint.dir": str(checkpoints),
        "tracking.experiment": "over-http",
        "tracking.log_system_metrics": "false",
        "tracking.num_overlay_images": 1,
    }
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "detr.cli", "train",
               *[arg for key, value in overrides.items() for arg in ("-o", f"{key}={value}")]]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (tmp_path / "mlflow.db").exists(), "logged to the local default store, not the server"

    import mlflow

    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name("over-http")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert f"MLflow run {run.info.run_id}" in result.stdout
    assert run.info.status == "FINISHED" and run.data.tags["training_status"] == "finished"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
    assert run.data.params["train.batch_size"] == "3" and run.data.params["model.hidden_dim"] == "32"
    assert run.data.metrics["epoch"] == 1.0
    # The finished run's served model went through the server too and loads back from it.
    assert run.data.tags["served_model_uri"].startswith("models:/m-")
    mlflow.set_tracking_uri(url)
    assert mlflow.models.get_model_info(run.data.tags["served_model_uri"]).signature.inputs.input_names() == ["image"]
    assert {"train/loss", "train/lr", "coco/AP", "voc/mAP50"} <= run.data.metrics.keys()

    listed = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/last.pt" in listed
    downloaded = Path(client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path / "dl")))
    local_last = sorted(checkpoints.glob("step-*.pt"))[-1]
    assert downloaded.read_bytes() == local_last.read_bytes()
    assert load_checkpoint(downloaded)["training_state"]["epoch"] == 1
    # The bytes went through the server into its artifact store.
    stored = list(artifacts.rglob("last.pt"))
    assert len(stored) == 1 and stored[0].read_bytes() == local_last.read_bytes()
