"""``detr tune --workers-per-trial 2``: each trial a Ray Train TorchTrainer of two workers. ASHA stops
the trial that falls behind; a worker killed mid-epoch (SIGKILL, by the PID its trial reported) is
restarted by Ray Train from the trial's last reported checkpoint, and the trial ends with bitwise the
weights of the same trial trained without the kill; the trial keeps its one MLflow child run, which
counts the restart, and the sweep run counts the search's retries."""

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
import torch

from detr.checkpoints.format import load_checkpoint
from detr.search.runs import RESTARTS, RETRIES, TRIAL_ID_TAG
from tests.tune.conftest import EXPERIMENT, micro_search_config

METRIC = "train/loss_mean"
EPOCHS = 4
TRAIN_COPIES = 5


def reports(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_multi_worker_trials_survive_a_killed_worker_and_continue_exactly(micro_synth_dir, tmp_path, tracking_uri):
    # The micro model has dropout and random image sizes: each rank draws its own amount of randomness,
    # which the restarted rank must continue from the checkpoint (rng_ranks), not take from rank 0.
    # Five copies of the 9 training images: epochs of about 10 s instead of 2. A trial's result.json
    # reaches the storage seconds after the worker's report (the driver writes it in a staging folder
    # and copies that to the storage from time to time), 8 s later on a busy 2-core machine; with 2-s
    # epochs the trial had ended before its first report was seen, and the worker to kill was gone.
    copies = ", ".join([f"{{path: {micro_synth_dir}, format: coco, split: train}}"] * TRAIN_COPIES)
    config = micro_search_config(micro_synth_dir, tmp_path, tracking_uri,
                                 **{"train.epochs": EPOCHS, "data.train": f"{{sources: [{copies}]}}"})
    config_path = tmp_path / "micro.yaml"
    config_path.write_text(config.to_yaml())
    # Two identical trials (the second is the first without the kill), side by side on the two CPUs
    # (half a CPU per worker), then one whose lr is far too high: its first-epoch loss is behind
    # theirs, and ASHA stops it at the first rung.
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [1.0e-4, 1.0e-4, 0.5]}\n")
    storage = tmp_path / "ray"
    command = [sys.executable, "-m", "detr.cli", "tune", str(config_path), "--space", str(space), "--samples", "1",
               "--max-concurrent", "2", "--metric", METRIC, "--mode", "min", "--grace-period", "1",
               "--workers-per-trial", "2", "--cpus-per-worker", "0.5", "--name", "workers", "--storage", str(storage)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    log = tmp_path / "tune.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # The first trial's first report names the process of its rank 0 worker: kill it mid-epoch.
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no report of the first trial within 300 s"
            first = sorted(storage.glob("workers/trial_*"))
            if first and reports(first[0]):
                break
            time.sleep(0.1)
        killed_trial = first[0]
        killed_pid = int(reports(killed_trial)[0]["worker/pid"])
        try:
            os.kill(killed_pid, signal.SIGKILL)
        except ProcessLookupError:
            pytest.fail(f"the rank 0 worker (pid {killed_pid}) of {killed_trial.name} had ended before its first "
                        f"report reached Tune: the trial is too short for this test ({len(reports(killed_trial))} "
                        "reports seen at once)")
        assert process.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    out = log.read_text()
    assert "3 trials, 1 stopped early by ASHA, 0 failed, 1 restarts after a failure" in out, out[-3000:]

    trial_dirs = sorted(storage.glob("workers/trial_*"))
    by_lr = {}
    for trial_dir in trial_dirs:
        rows = reports(trial_dir)
        by_lr.setdefault(rows[0]["config"]["train.lr"], []).append((trial_dir, rows))
    (stopped_dir, stopped_rows), = by_lr[0.5]
    assert [r["epoch"] for r in stopped_rows] == [1], "ASHA stops the trial that is behind at the first rung"
    killed_rows = dict(by_lr[1e-4])[killed_trial]
    (straight_dir, straight_rows), = [(d, r) for d, r in by_lr[1e-4] if d != killed_trial]
    # Each epoch reported once; the restarted worker is a new process, and the count says so.
    assert [r["epoch"] for r in killed_rows] == list(range(1, EPOCHS + 1))
    assert killed_rows[-1]["worker/pid"] != killed_pid
    assert killed_rows[0][RESTARTS] == 0 and killed_rows[-1][RESTARTS] == 1
    assert straight_rows[-1][RESTARTS] == 0
    # The same numbers every epoch, and bitwise the same weights at the end.
    assert [r[METRIC] for r in killed_rows] == [r[METRIC] for r in straight_rows]
    killed_weights = load_checkpoint(Path(killed_rows[-1]["checkpoint_path"]) / "checkpoint.pt")["model"]
    straight_weights = load_checkpoint(Path(straight_rows[-1]["checkpoint_path"]) / "checkpoint.pt")["model"]
    assert killed_weights.keys() == straight_weights.keys()
    assert all(torch.equal(killed_weights[k], straight_weights[k]) for k in killed_weights)

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    (sweep,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3, "one child run per trial, the restarted one included"
    assert sweep.data.metrics[RETRIES] == 1.0
    killed_id = killed_trial.name.removeprefix("trial_")
    (killed_run,) = [c for c in children if c.data.tags[TRIAL_ID_TAG] == killed_id]
    assert killed_run.info.status == "FINISHED" and killed_run.data.metrics[RESTARTS] == 1.0
    epochs = [(m.step, m.value) for m in client.get_metric_history(killed_run.info.run_id, "epoch")]
    assert epochs == [(e, float(e)) for e in range(1, EPOCHS + 1)]
    assert not any(key.startswith("worker/") for key in killed_run.data.metrics)


def test_worker_flag_mistakes_fail_before_ray_starts(micro_synth_dir, tmp_path, tracking_uri, capsys):
    from detr.cli import main

    config = tmp_path / "micro.yaml"
    config.write_text(micro_search_config(micro_synth_dir, tmp_path, tracking_uri).to_yaml())
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [1.0e-4]}\n")
    base = ["tune", str(config), "--space", str(space), "--samples", "1", "--storage", str(tmp_path / "ray")]
    cases = [
        (["--cpus-per-worker", "1"], "--cpus-per-worker need --workers-per-trial N"),
        (["--workers-per-trial", "2", "--cpus-per-trial", "2"], "--cpus-per-trial are for one-process trials"),
        (["--workers-per-trial", "0"], "--workers-per-trial must be at least 1, got 0"),
        (["--workers-per-trial", "2", "--gpus-per-worker", "1"], "train.device is cpu but --gpus-per-worker is 1"),
        (["--max-failures", "-1"], "--max-failures must be 0 or more, got -1"),
    ]
    for extra, expected in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("detr: error: ") and err.count("\n") == 1 and expected in err, (extra, err)
    import ray

    assert not ray.is_initialized() and not (tmp_path / "ray").exists()


@pytest.mark.slow
def test_a_trial_restored_from_its_last_epoch_reports_that_epoch_again(micro_synth_dir, tmp_path, tracking_uri,
                                                                        monkeypatch):
    """An interrupted search can keep a multi-worker trial's last report from its driver after Ray Train
    stored that epoch's checkpoint; restored, the trial continues from that checkpoint with nothing left
    to train. It reports the epoch again, as it was, so that the trial's run gets its last epoch."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from detr.search.trial_workers import _trial_worker

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = micro_search_config(micro_synth_dir, tmp_path, tracking_uri, **{"train.epochs": 1})
    loop_config = {"sampled": {}, "base_config": config.to_dict(), "fixed": {}, "metric": METRIC,
                   "root": str(tmp_path), "scratch_root": None, "trial_id": "restored", "trial_name": "restored"}
    received = tmp_path / "reports.jsonl"

    class RecordReports(ray.train.UserCallback):
        """Each report as the trainer's controller (another process) receives it: rank 0's metrics
        and whether a checkpoint came with them."""

        def after_report(self, run_context, metrics, checkpoint) -> None:
            with received.open("a") as out:
                out.write(json.dumps({"metrics": metrics[0], "checkpoint": checkpoint is not None}) + "\n")

    def fit() -> list[dict]:
        # The trial's Ray Train run, by name: a second fit continues from its newest checkpoint, as a
        # restored search's trial does.
        received.unlink(missing_ok=True)
        TorchTrainer(_trial_worker, train_loop_config=loop_config,
                     scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                     run_config=ray.train.RunConfig(name="trial", storage_path=str(tmp_path / "train_runs"),
                                                    callbacks=[RecordReports()])).fit()
        return [json.loads(line) for line in received.read_text().splitlines()] if received.exists() else []

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        trained = fit()
        restored = fit()
    finally:
        ray.shutdown()
    assert [(r["metrics"]["epoch"], r["checkpoint"]) for r in trained] == [(1, True)]
    # One report, without a checkpoint (nothing was trained), with the epoch's numbers as reported.
    assert [(r["metrics"]["epoch"], r["checkpoint"]) for r in restored] == [(1, False)], restored
    assert restored[0]["metrics"][METRIC] == trained[0]["metrics"][METRIC]
    assert not any(key.startswith("restored/") for key in restored[0]["metrics"])
