"""Training against a real ``mlflow server`` over HTTP, as against a team's tracking server.

The server stores runs in SQLite and serves artifacts itself (``--artifacts-destination``): the
client uploads checkpoints and plots through HTTP (``mlflow-artifacts:/`` URIs) and never touches
the server's directories, as with a remote server. The tracking URI reaches ``detr train`` only
through ``MLFLOW_TRACKING_URI``. One server for the module; each test logs to its own experiment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from detr.checkpoints.format import load_checkpoint
from detr.data.synth import generate_synthetic_dataset
from detr.tracking.continuation import REPLAY_MISMATCH_TAG, RESUME_COUNT_TAG, RESUME_HISTORY_TAG
from tests.engine.test_training import micro_overrides
from tests.servers import mlflow_tracking_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """(url, artifacts directory) of a server shared by the module's tests; stopped (with its
    workers) afterwards."""
    root = tmp_path_factory.mktemp("server")
    artifacts = root / "artifacts"
    with mlflow_tracking_server(f"sqlite:///{root / 'db.sqlite'}", artifacts, log=root / "server.log") as url:
        yield url, artifacts


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
    stored = [p for p in artifacts.rglob("last.pt") if run.info.run_id in p.parts]
    assert len(stored) == 1 and stored[0].read_bytes() == local_last.read_bytes()


def metric_steps(client: mlflow.MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_sigkilled_training_resumed_with_auto_continues_one_run_with_every_step_once(
        mlflow_server, micro_synth_dir, tmp_path):
    url, _ = mlflow_server
    client = mlflow.MlflowClient(url)
    experiment = "resume-after-sigkill"
    checkpoints = tmp_path / "checkpoints"
    # 9 training images at batch 1: 9 steps; a checkpoint every 2 steps and the losses logged at
    # every step, so that the steps between a checkpoint and the kill are logged by the killed
    # process and trained again by the resumed one.
    overrides = micro_overrides(micro_synth_dir, checkpoints, **{
        "train.batch_size": 1, "train.epochs": 1, "train.device": "cpu", "train.checkpoint.every_steps": 2,
        "tracking.experiment": experiment, "tracking.log_every_steps": 1, "tracking.log_system_metrics": "false",
        "tracking.num_overlay_images": 0, "tracking.log_model": "false"})
    command = [sys.executable, "-m", "detr.cli", "train", *[arg for o in overrides for arg in ("-o", o)]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    # Freeze the process (SIGSTOP) whenever a checkpoint exists, and kill it only once the run holds
    # a step past the newest checkpoint: then the resume must replay steps that are logged already.
    deadline = time.monotonic() + 300
    killed_at = None
    while killed_at is None:
        assert first.poll() is None, f"training ended before it was killed:\n{(tmp_path / 'first.log').read_text()}"
        assert time.monotonic() < deadline, "no checkpoint with a logged step after it within 300 s"
        time.sleep(0.2)
        if not list(checkpoints.glob("step-*.pt")):
            continue
        first.send_signal(signal.SIGSTOP)
        newest_checkpoint = load_checkpoint(sorted(checkpoints.glob("step-*.pt"))[-1])["training_state"]["step"]
        experiment_id = client.get_experiment_by_name(experiment).experiment_id
        runs = client.search_runs([experiment_id])
        logged = metric_steps(client, runs[0].info.run_id, "train/loss") if runs else []
        if logged and logged[-1] > newest_checkpoint and newest_checkpoint < 9:
            first.send_signal(signal.SIGKILL)
            killed_at = newest_checkpoint
        else:
            first.send_signal(signal.SIGCONT)
    first.wait()
    run_id = runs[0].info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing ended the killed run

    resumed = subprocess.run([*command, "--resume", "auto"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    runs = client.search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "the resume opened another run"
    assert f"MLflow run {run_id}" in resumed.stdout
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["training_status"] == "finished"
    # The killed run was found RUNNING and ended KILLED before it was reopened.
    assert run.data.tags[RESUME_COUNT_TAG] == "1"
    assert json.loads(run.data.tags[RESUME_HISTORY_TAG]) == [{"step": killed_at, "found": "RUNNING",
                                                               "ended_as": "KILLED"}]
    assert run.data.tags[REPLAY_MISMATCH_TAG] == "0"  # the replayed steps gave bitwise the logged values
    # Every step exactly once: no gap, no step logged by both processes.
    for key in ("train/loss", "train/lr", "train/loss_ce"):
        assert metric_steps(client, run_id, key) == list(range(1, 10)), key
    assert metric_steps(client, run_id, "epoch") == [9]
    assert metric_steps(client, run_id, "coco/AP") == [9]
    data_keys = [k for k in run.data.metrics if k.startswith("data/")]
    assert data_keys and all(metric_steps(client, run_id, k) == [0] for k in data_keys)
    assert load_checkpoint(sorted(checkpoints.glob("step-*.pt"))[-1])["mlflow_run_id"] == run_id


def test_doctor_finds_the_tracking_server(mlflow_server, tmp_path):
    url, _ = mlflow_server
    result = subprocess.run([sys.executable, "-m", "detr.cli", "doctor", "--tracking-uri", url,
                             "--storage", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tracking  ok: {url}" in result.stdout
    assert "UNREACHABLE" not in result.stdout
