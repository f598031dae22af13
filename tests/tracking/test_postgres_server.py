"""MLflow on a real database: an ``mlflow server`` whose backend store is PostgreSQL (started by the
test itself through the ``pgserver`` package, so it runs on a fresh machine) and whose artifacts are
on disk. A two-trial sweep, a training run, registration under an alias and ``mlflow models serve``
from that registry all go through it; the runs are read back from the database's own tables.

One PostgreSQL and one MLflow server for the module; every process is stopped by its PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import sqlalchemy
from PIL import Image

from deploy.images import encode_png_base64
from tests.engine.test_training import micro_overrides
from tests.servers import VENV_BIN, free_port, mlflow_tracking_server, postgres_database, server_process

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SWEEP_EXPERIMENT = "sweep-on-postgres"
TRAIN_EXPERIMENT = "train-on-postgres"


@pytest.fixture(scope="module")
def postgres_mlflow(tmp_path_factory) -> tuple[str, str]:
    """(server URL, backend store URI) of an ``mlflow server`` on a PostgreSQL of its own."""
    root = tmp_path_factory.mktemp("postgres-mlflow")
    with postgres_database() as backend_uri:
        with mlflow_tracking_server(backend_uri, root / "artifacts", log=root / "server.log") as url:
            yield url, backend_uri


def detr_cli(args: list[str], url: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "detr.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def cli_overrides(data: Path, checkpoints: Path, **extra) -> list[str]:
    overrides = micro_overrides(data, checkpoints, **{
        "train.epochs": 1, "train.device": "cpu", "tracking.log_system_metrics": "false",
        "tracking.num_overlay_images": 0, **extra})
    return [arg for o in overrides for arg in ("-o", o)]


@pytest.fixture(scope="module")
def sweep(postgres_mlflow, micro_synth_dir, tmp_path_factory) -> subprocess.CompletedProcess:
    """`detr tune` of the tiny search space, two trials of one epoch, the best registered as
    ``pg-sweep@champion``."""
    url, _ = postgres_mlflow
    work = tmp_path_factory.mktemp("sweep")
    return detr_cli(["tune", str(REPO / "configs/detr_tiny.yaml"), "--space", str(REPO / "configs/tune/tiny_lr.yaml"),
                     "--samples", "2", "--max-concurrent", "1", "--metric", "train/loss_mean", "--mode", "min",
                     "--storage", str(work / "ray"), "--name", "pg", "--register", "pg-sweep", "--alias", "champion",
                     *cli_overrides(micro_synth_dir, work / "unused", **{"tracking.experiment": SWEEP_EXPERIMENT})],
                    url, work)


def test_a_two_trial_sweep_is_recorded_in_postgresql(postgres_mlflow, sweep):
    url, backend_uri = postgres_mlflow
    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    sweeps = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(sweeps) == 1 and len(trials) == 2
    sweep_run = sweeps[0]
    assert f"MLflow sweep run {sweep_run.info.run_id}" in sweep.stdout
    assert sweep_run.info.status == "FINISHED"
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {sweep_run.info.run_id}
    assert all("train/loss_mean" in t.data.metrics and "train.lr" in t.data.params for t in trials)
    # The registered version is the sweep's best model.
    version = client.get_model_version_by_alias("pg-sweep", "champion")
    assert version.source == sweep_run.data.tags["served_model_uri"] or version.run_id == sweep_run.info.run_id
    # The runs live in PostgreSQL's tables, not in a file next to the server.
    engine = sqlalchemy.create_engine(backend_uri, poolclass=sqlalchemy.NullPool)
    with engine.connect() as connection:
        assert connection.dialect.name == "postgresql"
        stored = connection.execute(sqlalchemy.text("SELECT run_uuid, status FROM runs WHERE experiment_id = :e"),
                                    {"e": int(experiment.experiment_id)}).all()
        aliases = connection.execute(sqlalchemy.text("SELECT alias, version FROM registered_model_aliases "
                                                     "WHERE name = 'pg-sweep'")).all()
    assert {(r.info.run_id, r.info.status) for r in runs} == set(map(tuple, stored))
    assert [tuple(a) for a in aliases] == [("champion", int(version.version))]


def test_a_training_run_logs_and_registers_its_model_in_postgresql(postgres_mlflow, micro_synth_dir, tmp_path):
    url, _ = postgres_mlflow
    result = detr_cli(["train", *cli_overrides(micro_synth_dir, tmp_path / "checkpoints", **{
        "tracking.experiment": TRAIN_EXPERIMENT, "tracking.registered_model": "pg-trained",
        "tracking.registered_alias": "candidate", "tracking.log_every_steps": 1})], url, tmp_path)
    client = mlflow.MlflowClient(url)
    [run] = client.search_runs([client.get_experiment_by_name(TRAIN_EXPERIMENT).experiment_id])
    assert f"MLflow run {run.info.run_id}" in result.stdout
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert {"coco/AP", "voc/mAP50", "epoch"} <= run.data.metrics.keys()
    assert "checkpoints/last.pt" in {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    version = client.get_model_version_by_alias("pg-trained", "candidate")
    assert run.data.tags["served_model_uri"] == "models:/pg-trained@candidate" and version.version == "1"


def test_mlflow_models_serve_answers_from_the_postgresql_registry(postgres_mlflow, sweep, micro_synth_dir, tmp_path):
    url, _ = postgres_mlflow
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/pg-sweep@champion", "--env-manager",
               "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    pixels = np.asarray(Image.open(sorted((micro_synth_dir / "images").rglob("*.png"))[0]).convert("RGB"))
    with server_process(command, ready_url=f"http://127.0.0.1:{port}/ping", log=tmp_path / "serve.log", cwd=tmp_path,
                        env={"MLFLOW_TRACKING_URI": url}):
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120, json={
            "dataframe_records": [{"image": encode_png_base64(pixels)}],
            "params": {"score_threshold": 0.0, "max_detections": 3}})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    assert len(prediction["boxes"]) == len(prediction["scores"]) == len(prediction["labels"]) == 3
    assert prediction["image_size"] == [pixels.shape[1], pixels.shape[0]]
