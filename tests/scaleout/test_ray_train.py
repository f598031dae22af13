"""``detr train --workers N``: the Trainer in Ray Train workers (gloo on CPU) trains what one process
does at N times the batch, as torchrun does (tests/engine/test_distributed.py says why the model is
set up so that the split of a batch does not matter, and which differences remain)."""

from __future__ import annotations

import os

import mlflow
import pytest

from detr.cli import main
from detr.config import load_config
from detr.run import train_from_config
from tests.engine.test_distributed import PER_PROCESS_BATCH, ddp_overrides, final_weights, max_difference


@pytest.mark.slow
def test_two_ray_workers_at_batch_b_train_like_one_process_at_2b(small_synth_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative paths below: the workers work where the command was typed
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    overrides = ddp_overrides(small_synth_dir, tmp_path / "unused", PER_PROCESS_BATCH)
    overrides = [o for o in overrides if not o.startswith("train.checkpoint.dir=")]
    args = ["train", "--workers", "2", *[a for o in overrides for a in ("-o", o)],
            "-o", "train.checkpoint.dir=ray_ddp", "-o", "tracking.tracking_uri=sqlite:///mlflow.db",
            "-o", "tracking.log_model=false"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "trained 2 epochs (4 steps); checkpoints in ray_ddp" in out, out

    single_2b = tmp_path / "single_2b"
    train_from_config(load_config(None, ddp_overrides(small_synth_dir, single_2b, 2 * PER_PROCESS_BATCH)),
                      track=False, progress=False)
    gap = max_difference(final_weights(tmp_path / "ray_ddp"), final_weights(single_2b))
    # The tolerance of the torchrun test: summation order only.
    assert gap < 1e-5, f"2 Ray workers x {PER_PROCESS_BATCH} vs 1 x {2 * PER_PROCESS_BATCH}: max |dw| {gap}"

    # Rank 0 alone logged, into the store named relative to where the command was typed.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["epoch"] == 2.0
    assert f"MLflow run {run.info.run_id}" in out


def test_ray_flags_are_checked_before_ray_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cases = [
        (["--gpus-per-worker", "1"], "--gpus-per-worker need --workers N"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--workers", "2", "--cpus-per-worker", "0"], "--cpus-per-worker must be above 0, got 0"),
        (["--workers", "2", "--gpus-per-worker", "1", "-o", "train.device=cpu"],
         "train.device is cpu but --gpus-per-worker is 1"),
        (["--workers", "2", "-o", "train.device=cuda"], "train.device is cuda but --gpus-per-worker is 0"),
        (["--workers", "2", "--address", "127.0.0.1:1"], "no Ray cluster answers at '127.0.0.1:1'"),
    ]
    for extra, expected in cases:
        assert main(["train", "configs/detr_tiny.yaml" if os.path.exists("configs/detr_tiny.yaml") else "",
                     *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("detr: error: ") and expected in err, (extra, err)
    import ray

    assert not ray.is_initialized()
