"""The search end to end: Ray Tune ASHA over the micro model, recorded in MLflow as one sweep run
with a child run per trial, the best checkpoint served as a pyfunc model; an interrupted search
resumed from its trials' checkpoints; and the mistakes that must fail before Ray starts."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from deploy.images import encode_png_base64
from detr.checkpoints.format import load_checkpoint
from detr.cli import main
from detr.config import apply_overrides, load_config
from detr.data.synth import CLASSES, image_rng, render_scene
from detr.errors import ConfigError, InvalidInputError
from detr.run import train_from_config
from detr.search.runs import PLOT_ARTIFACT, TRIAL_ID_TAG
from detr.search.space import search_space_from_dict
from tests.tune.conftest import EXPERIMENT, micro_search_config

REPO = Path(__file__).resolve().parents[2]
METRIC = "train/loss_mean"
# AP50 of the micro model is 0.0 for every trial after three epochs: ties, which ASHA never stops
# and which leave no best trial to find. The epoch's mean loss differs with the lr, and the grid
# fixes the order of the trials. Epoch-1 losses (deterministic for a seed): lr 1e-5 18.680, 1e-4
# 18.685, 1e-3 18.936, 3e-3 18.925. One trial at a time: trial 0 is alone at the first rung (epoch
# 1) and goes on; trials 1, 2 and 3 are each worse than the rung's median so far, so ASHA stops them
# after one epoch. Weight decay is sampled to show a sampled
# parameter: at most 1e-4 of lr-sized steps, it moves these losses by far less than the margins.
SPACE = {"train.lr": {"grid": [1e-5, 1e-4, 1e-3, 3e-3]}, "train.weight_decay": {"loguniform": [1e-6, 1e-4]}}


def runs_of(tracking_uri: str) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    return parents[0], [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def logged_epochs(tracking_uri: str) -> list[float]:
    """The last epoch each child run has logged so far."""
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    return [r.data.metrics.get("epoch", 0.0) for r in runs if "mlflow.parentRunId" in r.data.tags]


def history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, key)]


@pytest.mark.slow
def test_asha_search_logs_a_sweep_run_with_one_child_per_trial_and_serves_the_best(micro_data, tmp_path,
                                                                                    tracking_uri):
    from detr.search.tune import run_search

    config = micro_search_config(micro_data, tmp_path, tracking_uri)
    space = search_space_from_dict(SPACE, source="micro_space.yaml")
    # One trial at a time: the trials reach ASHA's rungs in grid order, so which trials it stops does
    # not depend on how fast each runs (two at a time, a loaded machine reordered them).
    outcome = run_search(config, space, num_samples=1, max_concurrent_trials=1, storage_path=tmp_path / "ray",
                         metric=METRIC, mode="min", grace_period=1, reduction_factor=2, name="micro",
                         register=("micro-search", "champion"))

    sweep, children = runs_of(tracking_uri)
    assert sweep.info.run_id == outcome.sweep_run_id and sweep.info.status == "FINISHED"
    assert len(children) == 4 == len(outcome.trials)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {sweep.info.run_id}
    by_trial = {c.data.tags[TRIAL_ID_TAG]: c for c in children}
    for trial in outcome.trials:
        child = by_trial[trial.trial_id]
        assert child.info.status == "FINISHED" and child.info.run_id == trial.run_id
        # The sampled params, as the trial trained with them.
        assert float(child.data.params["train.lr"]) == trial.params["train.lr"]
        assert 1e-6 <= float(child.data.params["train.weight_decay"]) <= 1e-4
        # One value per reported epoch, the epoch as the step; no Ray bookkeeping as metrics.
        assert history(tracking_uri, child.info.run_id, "epoch") == [(e, float(e)) for e in range(1, trial.epochs + 1)]
        losses = history(tracking_uri, child.info.run_id, METRIC)
        assert losses == [(e, pytest.approx(v)) for e, v in trial.history]
        assert {"coco/AP50", "voc/mAP50"} <= child.data.metrics.keys()
        assert not {"pid", "timestamp", "training_iteration"} & child.data.metrics.keys()

    # ASHA stopped the trials that were behind at the first rung (see SPACE) after one epoch.
    epochs = {t.params["train.lr"]: t.epochs for t in outcome.trials}
    assert epochs[1e-3] == 1 and epochs[3e-3] == 1 and max(epochs.values()) == 3, epochs
    assert {t.status for t in outcome.stopped_early} == {"stopped early"} and len(outcome.stopped_early) >= 2

    # The best trial: the lowest loss over every epoch of every trial, as the child runs recorded it.
    best_value, best_trial = min((min(v for _, v in history(tracking_uri, c.info.run_id, METRIC)),
                                  c.data.tags[TRIAL_ID_TAG]) for c in children)
    assert outcome.best.trial_id == best_trial and outcome.best.best_value == pytest.approx(best_value)
    assert sweep.data.metrics[f"best/{METRIC}"] == pytest.approx(best_value)
    assert sweep.data.params["best.train.lr"] == str(outcome.best.params["train.lr"])
    assert sweep.data.tags["search.best_run_id"] == outcome.best.run_id
    assert sweep.data.metrics["trials/stopped_early"] == len(outcome.stopped_early)
    assert sweep.data.params["search.metric"] == METRIC and sweep.data.params["search.trials"] == "4"

    client = mlflow.MlflowClient(tracking_uri)
    artifacts = {a.path for folder in ("plots", "search") for a in client.list_artifacts(sweep.info.run_id, folder)}
    assert {PLOT_ARTIFACT, "search/search_space.yaml", "search/base_config.json"} <= artifacts
    space_logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{sweep.info.run_id}/search/search_space.yaml"))
    assert space_logged == {"train.lr": {"grid": [1e-5, 1e-4, 1e-3, 3e-3]},
                            "train.weight_decay": {"loguniform": [1e-6, 1e-4]}}

    # The best checkpoint is the sweep run's pyfunc model, registered under the alias.
    assert outcome.served_model_uri == "models:/micro-search@champion"
    version = client.get_model_version_by_alias("micro-search", "champion")
    assert version.run_id == sweep.info.run_id
    model = mlflow.pyfunc.load_model(outcome.served_model_uri)
    image = render_scene(image_rng(0, 5), 96, 96).image
    (record,) = model.predict(pd.DataFrame({"image": [encode_png_base64(image)]}), params={"score_threshold": 0.0})
    assert record["image_size"] == [96, 96] and len(record["boxes"]) == len(record["scores"]) > 0
    assert set(record["labels"]) <= set(CLASSES)


def write_micro_config(micro_data: Path, tmp_path: Path, tracking_uri: str) -> Path:
    path = tmp_path / "micro.yaml"
    path.write_text(micro_search_config(micro_data, tmp_path, tracking_uri).to_yaml())
    return path


@pytest.mark.slow
@pytest.mark.parametrize("workers_per_trial", [1, 2])
def test_an_interrupted_search_resumes_each_trial_from_its_checkpoint(micro_data, tmp_path, tracking_uri, capsys,
                                                                      workers_per_trial):
    """Ctrl-C once a trial's second epoch has reached the driver, then `detr tune --resume`: the same
    sweep run and child runs carry on, and a restored trial goes on from its checkpoint, exactly.
    With two workers per trial each trial is a Ray Train TorchTrainer restored from that checkpoint."""
    # Six epochs and Ctrl-C after the second: four epochs (several seconds) of margin for the signal
    # to land while both trials still run, however fast the machine.
    epochs = 6
    config = tmp_path / "micro.yaml"
    config.write_text(micro_search_config(micro_data, tmp_path, tracking_uri, **{"train.epochs": epochs}).to_yaml())
    space = tmp_path / "lr.yaml"
    space.write_text("train.lr: {grid: [1.0e-4, 3.0e-4]}\n")
    storage = tmp_path / "ray"
    # grace period = train.epochs: ASHA stops nobody, so both trials are still running at Ctrl-C.
    command = [sys.executable, "-m", "detr.cli", "tune", str(config), "--space", str(space), "--samples", "1",
               "--max-concurrent", "2", "--metric", METRIC, "--mode", "min", "--grace-period", str(epochs),
               "--name", "resumable", "--storage", str(storage)]
    if workers_per_trial > 1:
        command += ["--workers-per-trial", str(workers_per_trial), "--cpus-per-worker", "0.5"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with (tmp_path / "first.log").open("w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    # The driver logs a report to the trial's MLflow run, then registers its checkpoint in a second
    # step; it asks for the next report only after that: a second epoch in a run means the first
    # epoch's checkpoint is the trial's. (Not the trial's result.json in the storage: the driver writes
    # it in a staging folder that Ray copies there with each Tune checkpoint, and the reports of a
    # multi-worker trial carry none, its checkpoints being Ray Train's.)
    while max(logged_epochs(tracking_uri), default=0) < 2:
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial checkpoint within 240 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    first_log = (tmp_path / "first.log").read_text()
    assert "continue it with --resume --name resumable" in first_log
    sweep, children = runs_of(tracking_uri)
    assert sweep.info.status == "KILLED"
    interrupted_at = {c.data.tags[TRIAL_ID_TAG]: len(history(tracking_uri, c.info.run_id, "epoch")) for c in children}
    assert any(0 < n < epochs for n in interrupted_at.values()), interrupted_at
    capsys.readouterr()
    assert main(command[3:]) == 2  # the same command without --resume
    assert "a search named 'resumable' already exists" in capsys.readouterr().err
    assert main([*command[3:], "--resume", "--samples", "2", "--mode", "max"]) == 2
    assert ("search 'resumable' must continue as it started; changed: search.mode=max (it started with min); "
            "search.num_samples=2 (it started with 1)") in " ".join(capsys.readouterr().err.split())

    result = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "best trial trial_" in result.stdout and f"MLflow sweep run {sweep.info.run_id}" in result.stdout

    resumed_sweep, children = runs_of(tracking_uri)  # still one sweep run
    assert resumed_sweep.info.run_id == sweep.info.run_id and resumed_sweep.info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    restored = []
    for child in children:
        # Each epoch once (an epoch a restored trial reports again is not logged twice).
        assert history(tracking_uri, child.info.run_id, "epoch") == [(e, float(e)) for e in range(1, epochs + 1)]
        trial_dir = storage / "resumable" / f"trial_{child.data.tags[TRIAL_ID_TAG]}"
        reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert reports[-1]["epoch"] == epochs and not math.isnan(reports[-1][METRIC])
        # A trial Ray restored from a checkpoint counts fewer iterations since the restore than in all.
        if reports[-1]["iterations_since_restore"] < epochs:
            restored.append((float(child.data.params["train.lr"]), trial_dir))
        # An epoch reported again after the restore has the same numbers: resuming is exact.
        first = {}
        for report in reports:
            assert first.setdefault(report["epoch"], report[METRIC]) == report[METRIC]
    assert restored, "no trial continued from a checkpoint"
    if workers_per_trial > 1:
        # The repeated epochs above matched; bitwise weights of a restored multi-worker trial against
        # an uninterrupted one: tests/scaleout/test_trial_workers.py.
        return
    lr, trial_dir = restored[0]
    resumed_weights = final_trial_weights(trial_dir)
    # Exactly: the same weights as the same trial trained without a break (one thread, as in a trial).
    straight = apply_overrides(load_config(config), {"train.lr": lr,
                                                     "train.checkpoint.dir": str(tmp_path / "straight")}, source="test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_from_config(straight, track=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    expected = load_checkpoint(sorted((tmp_path / "straight").glob("step-*.pt"))[-1])["model"]
    assert expected.keys() == resumed_weights.keys()
    assert all(torch.equal(expected[k], resumed_weights[k]) for k in expected)


def final_trial_weights(trial_dir: Path) -> dict[str, torch.Tensor]:
    """The model of the newest checkpoint Tune kept for a trial."""
    newest = sorted(trial_dir.glob("checkpoint_*"))[-1]
    return load_checkpoint(newest / "checkpoint.pt")["model"]


def test_mistakes_fail_before_ray_starts(micro_data, tmp_path, tracking_uri):
    from detr.search.tune import run_search

    config = micro_search_config(micro_data, tmp_path, tracking_uri)
    space = search_space_from_dict(SPACE, source="micro_space.yaml")
    common = {"num_samples": 1, "storage_path": tmp_path / "ray"}
    with pytest.raises(InvalidInputError, match=r"no Ray cluster answers at '127\.0\.0\.1:1' .* `ray start --head`"):
        run_search(config, space, address="127.0.0.1:1", **common)
    with pytest.raises(InvalidInputError, match=r"no search named 'gone' in .* to continue"):
        run_search(config, space, name="gone", resume=True, **common)
    with pytest.raises(InvalidInputError, match=r"resuming needs the name of the search"):
        run_search(config, space, resume=True, **common)
    with pytest.raises(InvalidInputError, match=r"grace period 5 is longer than train\.epochs \(3\)"):
        run_search(config, space, grace_period=5, **common)
    with pytest.raises(InvalidInputError, match=r"mode must be 'max' or 'min'.*reduction factor must be above 1"):
        run_search(config, space, mode="maximum", reduction_factor=1, **common)
    with pytest.raises(InvalidInputError, match=r"metric 'coco/ap50' is not one an epoch reports \(did you mean "
                                                 r"'coco/AP50'\?\): choose one of coco/AP, "):
        run_search(config, space, metric="coco/ap50", **common)
    with pytest.raises(InvalidInputError, match=r"alias 'v1': use letters"):
        run_search(config, space, register=("shapes", "v1"), **common)
    with pytest.raises(ConfigError, match=r"train\.eval_every_epochs is 2: a search evaluates every epoch"):
        run_search(micro_search_config(micro_data, tmp_path, tracking_uri, **{"train.eval_every_epochs": 2}), space,
                   **common)
    bad = search_space_from_dict({"train.lr": {"loguniform": [1e-5, 1e-3]}, "model.nheads": {"choice": [4, 5]}},
                                 source="bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'model\.nheads' = 5 .* divisible by nheads"):
        run_search(config, bad, **common)
    assert not (tmp_path / "ray").exists()


def test_cli_reports_space_and_cluster_mistakes_on_one_line(micro_data, tmp_path, tracking_uri, capsys):
    config = write_micro_config(micro_data, tmp_path, tracking_uri)
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [1.0e-3, 1.0e-5]}\n")
    base = ["tune", str(config), "--samples", "2", "--storage", str(tmp_path / "ray")]
    cases = [
        (["--space", str(space)], rf"{space}: 'train\.lr': loguniform: low \(0\.001\) must be below high"),
        (["--space", str(tmp_path / "none.yaml")], r"none\.yaml: search space file not found"),
        (["--space", str(REPO / "configs/tune/tiny_lr.yaml"), "--address", "127.0.0.1:1"],
         r"no Ray cluster answers at '127\.0\.0\.1:1'"),
        (["--space", str(REPO / "configs/tune/tiny_lr.yaml"), "--alias", "best"], r"--alias needs --register NAME"),
    ]
    for extra, expected in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("detr: error: ") and err.count("\n") == 1, err
        assert re.search(expected, err), err
