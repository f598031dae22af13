"""End-to-end training: exact resume (in process and after SIGKILL), non-finite losses, Ctrl-C,
evaluation that does not depend on batch size, and what a run logs to MLflow."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detr.checkpoints.format import load_checkpoint
from detr.config import Config, load_config
from detr.engine.trainer import NonFiniteLossError
from detr.errors import CheckpointError, DatasetFormatError
from detr.run import evaluate_checkpoint, evaluate_checkpoint_report, train_from_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def synth_dir(micro_synth_dir) -> Path:
    return micro_synth_dir


def micro_overrides(synth_dir: Path, checkpoint_dir: Path, **extra) -> list[str]:
    """A very small DETR on 96x96 images: a few seconds per epoch on two cores."""
    overrides = {
        "data.train": f"{{sources: [{{path: {synth_dir}, format: coco, split: train}}]}}",
        "data.val": f"{{sources: [{{path: {synth_dir}, format: coco, split: val}}]}}",
        "data.transforms.train": "[{name: random_horizontal_flip, args: {p: 0.5}}, "
                                 "{name: random_resize, args: {sizes: [64, 80, 96], max_size: 128}}, {name: normalize}]",
        "data.transforms.val": "[{name: resize, args: {size: 96, max_size: 128}}, {name: normalize}]",
        "model.backbone.name": "resnet18",
        "model.backbone.trainable_layers": 5,
        "model.backbone.frozen_batchnorm": "false",
        "model.hidden_dim": 32,
        "model.nheads": 4,
        "model.enc_layers": 1,
        "model.dec_layers": 2,
        "model.dim_feedforward": 64,
        "model.num_queries": 6,
        "model.dropout": 0.1,  # dropout draws from the RNG: resume must restore it exactly
        "train.batch_size": 3,
        "train.epochs": 2,
        "train.checkpoint.dir": str(checkpoint_dir),
        "train.checkpoint.keep_last": 10,
        "train.seed": 7,
        **extra,
    }
    return [f"{k}={v}" for k, v in overrides.items()]


def micro_config(synth_dir: Path, checkpoint_dir: Path, **extra) -> Config:
    return load_config(None, micro_overrides(synth_dir, checkpoint_dir, **extra))


def final_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    latest = sorted(checkpoint_dir.glob("step-*.pt"))[-1]
    return load_checkpoint(latest)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight_run(synth_dir, tmp_path_factory) -> Path:
    """Two epochs without interruption: the reference for the resume tests."""
    directory = tmp_path_factory.mktemp("straight")
    train_from_config(micro_config(synth_dir, directory), track=False, progress=False)
    return directory


def test_resume_after_one_epoch_is_bitwise_exact(synth_dir, straight_run, tmp_path):
    train_from_config(micro_config(synth_dir, tmp_path, **{"train.epochs": 1}), track=False, progress=False)
    outcome = train_from_config(micro_config(synth_dir, tmp_path), resume="auto", track=False, progress=False)
    assert outcome.epochs == 2
    assert_same_weights(final_weights(tmp_path), final_weights(straight_run))


def test_resume_mid_epoch_is_bitwise_exact(synth_dir, straight_run, tmp_path):
    # Checkpoint every step, then resume from the one written after step 1 of epoch 1 (3 steps/epoch).
    train_from_config(micro_config(synth_dir, tmp_path, **{"train.checkpoint.every_steps": 1}),
                      track=False, progress=False)
    first = tmp_path / "step-00000001.pt"
    assert load_checkpoint(first)["training_state"]["samples_in_epoch"] == 3
    resumed = tmp_path / "resumed"
    train_from_config(micro_config(synth_dir, resumed), resume=first, track=False, progress=False)
    assert_same_weights(final_weights(resumed), final_weights(straight_run))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_loses_only_uncheckpointed_steps(synth_dir, straight_run, tmp_path):
    overrides = micro_overrides(synth_dir, tmp_path, **{"train.checkpoint.every_steps": 1})
    command = [sys.executable, "-m", "detr.cli", "train", "--no-track",
               *[arg for o in overrides for arg in ("-o", o)]]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    # Kill as soon as the second step's checkpoint exists: mid-epoch 1, before its end.
    while not (tmp_path / "step-00000002.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    newest = sorted(tmp_path.glob("step-*.pt"))[-1]
    state = load_checkpoint(newest)["training_state"]
    assert state["step"] >= 2 and state["epoch"] == 0 or state["step"] >= 3
    result = subprocess.run([*command, "--resume", "auto"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert_same_weights(final_weights(tmp_path), final_weights(straight_run))


def test_resume_auto_without_checkpoints_starts_fresh_and_bad_paths_fail(synth_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        train_from_config(micro_config(synth_dir, tmp_path), resume=tmp_path / "missing.pt", track=False,
                          progress=False)


def test_resume_with_another_label_map_names_both_sides(synth_dir, straight_run, tmp_path):
    config = micro_config(synth_dir, tmp_path, **{"data.labels.keep": "[circle, square]"})
    latest = sorted(straight_run.glob("step-*.pt"))[-1]
    with pytest.raises(DatasetFormatError, match=r"checkpoint .*step-.*only in checkpoint"):
        train_from_config(config, resume=latest, track=False, progress=False)


def test_nonfinite_loss_names_step_images_and_checkpoint(synth_dir, tmp_path, monkeypatch):
    from detr.models.criterion import SetCriterion

    original = SetCriterion.forward

    def poisoned(self, outputs, targets, step_targets=None):
        losses = original(self, outputs, targets, step_targets)
        return {k: v * float("nan") if k == "loss_bbox" else v for k, v in losses.items()}

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    with pytest.raises(NonFiniteLossError) as info:
        train_from_config(micro_config(synth_dir, tmp_path), track=False, progress=False)
    message = str(info.value)
    assert "at step 1 (epoch 1)" in message and "for images [" in message
    assert "last good checkpoint: none written yet" in message and "on_nonfinite_loss=skip" in message

    outcome = train_from_config(micro_config(synth_dir, tmp_path / "skip", **{"train.on_nonfinite_loss": "skip"}),
                                track=False, progress=False)
    assert outcome.steps == 0
    assert outcome.metrics["train/skipped_batches"] == 6  # 3 batches per epoch, 2 epochs, all skipped


def test_a_fresh_start_refuses_a_directory_holding_another_runs_checkpoints(synth_dir, straight_run):
    before = sorted(p.name for p in straight_run.iterdir())
    with pytest.raises(CheckpointError) as info:
        train_from_config(micro_config(synth_dir, straight_run), track=False, progress=False)
    message = " ".join(str(info.value).split())
    assert f"train.checkpoint.dir {straight_run} already holds checkpoints of an earlier run" in message
    assert "--resume auto" in message and "best.pt" in message
    assert sorted(p.name for p in straight_run.iterdir()) == before  # nothing written or removed


def test_progress_prints_one_summary_line_per_epoch(synth_dir, tmp_path, capsys):
    train_from_config(micro_config(synth_dir, tmp_path), track=False, progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[:2] for line in lines] == [["epoch 1/2", "step 3"], ["epoch 2/2", "step 6"]]
    assert all(re.search(r"loss \d+\.\d{3}  coco/AP \d\.\d{3}  coco/AP50 \d\.\d{3}", line) for line in lines), lines


def test_evaluation_does_not_depend_on_batch_size(straight_run):
    checkpoint = sorted(straight_run.glob("step-*.pt"))[-1]
    at_one = evaluate_checkpoint(checkpoint, batch_size=1, progress=False)
    at_four = evaluate_checkpoint(checkpoint, batch_size=4, progress=False)
    assert at_one.keys() == at_four.keys()
    for key in at_one:
        assert at_one[key] == pytest.approx(at_four[key], abs=1e-6, nan_ok=True), key


def test_diagnostics_do_not_depend_on_batch_size(straight_run):
    # Threshold 0: every detection of the young model takes part in the confusion matrix.
    checkpoint = sorted(straight_run.glob("step-*.pt"))[-1]
    at_one, report_one = evaluate_checkpoint_report(checkpoint, batch_size=1, progress=False, score_threshold=0.0,
                                                    draw=False)
    at_four, report_four = evaluate_checkpoint_report(checkpoint, batch_size=4, progress=False, score_threshold=0.0,
                                                      draw=False)
    assert {"tide/AP50", "tide/dAP/loc", "confusion/recall"} <= at_one.keys() == at_four.keys()
    for key in at_one:
        assert at_one[key] == pytest.approx(at_four[key], abs=1e-6, nan_ok=True), key
    assert (report_one.diagnostics.confusion.counts == report_four.diagnostics.confusion.counts).all()
    assert report_one.diagnostics.confusion.counts.sum() > 0
    assert [w.image_id for w in report_one.diagnostics.worst] == [w.image_id for w in report_four.diagnostics.worst]


def test_evaluate_command_prints_a_summary_writes_and_logs_the_diagnostics(straight_run, tmp_path, monkeypatch,
                                                                            capsys):
    import json

    import mlflow

    from detr.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    run_id = mlflow.MlflowClient(uri).create_run(mlflow.MlflowClient(uri).create_experiment("e")).info.run_id
    checkpoint = sorted(straight_run.glob("step-*.pt"))[-1]
    main(["evaluate", str(checkpoint), "--score-threshold", "0.05", "--report", "report", "--json", "m.json",
          "--mlflow-run", run_id])
    out = capsys.readouterr().out
    assert "at score >= 0.05 and IoU 0.50, over 3 images:" in out and "TIDE dAP50" in out
    assert (tmp_path / "report" / "confusion_matrix.png").is_file() and (tmp_path / "report" / "summary.txt").is_file()
    assert json.loads((tmp_path / "m.json").read_text())["confusion/score_threshold"] == 0.05
    client = mlflow.MlflowClient(uri)
    logged = {f.path for f in client.list_artifacts(run_id, "evaluate/val")}
    assert {"evaluate/val/confusion_matrix.png", "evaluate/val/confusion_matrix.json", "evaluate/val/tide_errors.png",
            "evaluate/val/per_class.json", "evaluate/val/summary.txt"} <= logged
    assert "evaluate/val/tide/dAP/miss" in client.get_run(run_id).data.metrics


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(synth_dir, tmp_path):
    overrides = micro_overrides(synth_dir, tmp_path, **{"train.epochs": 50})
    command = [sys.executable, "-m", "detr.cli", "train", "--no-track",
               *[arg for o in overrides for arg in ("-o", o)]]
    # Ctrl-C as in a terminal even when the tests run as a background job (which ignores SIGINT, and
    # Python then installs no KeyboardInterrupt handler in the child).
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("step-*.pt")):  # the first epoch finished: training is under way
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "training interrupted; checkpoint saved to" in stderr
    assert "Traceback" not in stderr
    saved = Path(stderr.split("checkpoint saved to ")[1].split(";")[0])
    assert load_checkpoint(saved)["training_state"]["step"] >= 3  # at least the first epoch's 3 steps


def test_mlflow_run_records_params_metrics_artifacts_tags_and_inputs(synth_dir, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = micro_config(synth_dir, tmp_path / "ckpt", **{"tracking.tracking_uri": uri,
                                                           "tracking.experiment": "t", "tracking.num_overlay_images": 2,
                                                           "tracking.log_system_metrics": "false"})
    outcome = train_from_config(config, progress=False)
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ  # no stale experiment leaks into child processes
    client = mlflow.MlflowClient(uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "3" and run.data.params["model.hidden_dim"] == "32"
    assert run.data.tags["model_variant"] == "detr" and run.data.tags["msda_backend"] in ("reference", "native")
    assert "coco/AP" in run.data.metrics and "train/loss" in run.data.metrics and "train/lr" in run.data.metrics
    history = client.get_metric_history(outcome.run_id, "train/loss")
    assert len(history) >= 1
    artifacts = {f.path for f in client.list_artifacts(outcome.run_id)}
    assert {"config", "label_map.json", "plots", "checkpoints"} <= artifacts
    plots = {f.path for f in client.list_artifacts(outcome.run_id, "plots")}
    assert "plots/loss_curves.png" in plots and any("pr_curves" in p for p in plots)
    checkpoints = {f.path for f in client.list_artifacts(outcome.run_id, "checkpoints")}
    assert "checkpoints/last.pt" in checkpoints
    inputs = run.inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"synth:train", "synth:val"}
    assert all(i.dataset.digest for i in inputs)
    images = client.list_artifacts(outcome.run_id, "images")
    assert images, "prediction overlays were not logged"
    # The final evaluation's diagnostics: confusion matrix and TIDE chart (PNG + JSON), tables, summary.
    diagnostics = {f.path for f in client.list_artifacts(outcome.run_id, "diagnostics")}
    assert {"diagnostics/confusion_matrix.png", "diagnostics/confusion_matrix.json", "diagnostics/tide_errors.png",
            "diagnostics/per_class.json", "diagnostics/worst_images.json", "diagnostics/summary.txt"} <= diagnostics
    assert "tide/AP50" in run.data.metrics and "confusion/recall" in run.data.metrics
    # The micro model scores below the serving threshold: the drawn predictions say so in their caption.
    summary = mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/diagnostics/summary.txt")
    assert "score >= 0.50" in summary


def test_a_finished_run_logs_and_registers_its_best_checkpoint_as_the_served_model(synth_dir, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from deploy.detector import DetectionParams, Detector
    from deploy.images import encode_png_base64
    from detr.data.loader import read_rgb_image
    from detr.data.formats import load_dataset

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = micro_config(synth_dir, tmp_path / "ckpt", **{
        "tracking.tracking_uri": uri, "tracking.log_system_metrics": "false", "tracking.num_overlay_images": 0,
        "tracking.registered_model": "micro", "tracking.registered_alias": "candidate"})
    outcome = train_from_config(config, progress=False)
    assert outcome.served_model_uri == "models:/micro@candidate"
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("micro", "candidate")
    assert version.run_id == outcome.run_id
    run = client.get_run(outcome.run_id)
    assert run.data.tags["served_model_uri"] == "models:/micro@candidate"
    assert run.data.tags["served_checkpoint"] == "best.pt"
    best = outcome.checkpoint_dir / "best.pt"
    assert load_checkpoint(best)["mlflow_run_id"] == outcome.run_id  # `detr register` finds the run

    record = load_dataset(synth_dir, format="coco", split="val").records[0]
    pixels = read_rgb_image(record)
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(outcome.served_model_uri).predict(
        pd.DataFrame({"image": [encode_png_base64(pixels)]}), params={"score_threshold": 0.0})
    expected = Detector.from_checkpoint(best).detect([pixels], DetectionParams(score_threshold=0.0))
    assert served[0]["scores"] == pytest.approx(expected[0]["scores"], rel=1e-6)


def test_an_alias_mlflow_would_refuse_is_a_config_error(synth_dir, tmp_path):
    from detr.errors import ConfigError

    with pytest.raises(ConfigError, match="registered_alias 'latest'"):
        micro_config(synth_dir, tmp_path / "ckpt", **{"tracking.registered_alias": "latest"})
