"""The demo's dataset handling (the whole demo runs in tests/test_mlproject.py, under `mlflow run`)."""

from __future__ import annotations

import sys

import pytest

from detr.cli import main
from detr.demo import DemoResult, ensure_demo_dataset
from detr.tracking import mlflow_executable
from detr.errors import InvalidInputError


def test_an_existing_generated_dataset_is_reused_not_regenerated(tmp_path, capsys):
    data = tmp_path / "synth"
    ensure_demo_dataset(data, images=4, seed=1)
    train_json = data / "annotations" / "train.json"
    before = train_json.stat().st_mtime_ns
    ensure_demo_dataset(data, images=4, seed=1)
    assert train_json.stat().st_mtime_ns == before
    assert f"reusing the dataset in {data}" in capsys.readouterr().out


def test_a_directory_that_is_not_a_generated_dataset_is_refused_by_name(tmp_path):
    data = tmp_path / "mine"
    (data / "annotations").mkdir(parents=True)
    (data / "annotations" / "train.json").write_text("{}")
    with pytest.raises(InvalidInputError, match=r"mine exists but has no annotations/val\.json"):
        ensure_demo_dataset(data, images=4, seed=1)


def test_too_few_images_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "d"), "--images", "1"]) == 2
    assert "--images 1: the demo needs at least 2 images" in capsys.readouterr().err


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///mlflow.db", "{mlflow} ui --backend-store-uri sqlite:///mlflow.db"),
    ("sqlite:////tmp/my runs/m.db", "{mlflow} ui --backend-store-uri 'sqlite:////tmp/my runs/m.db'"),
    ("http://127.0.0.1:5000/", "open http://127.0.0.1:5000/#/experiments (the server is already running)"),
])
def test_the_closing_hint_names_the_store_training_logged_to(tmp_path, uri, expected):
    hint = DemoResult(run_id="r", tracking_uri=uri, checkpoint=tmp_path / "best.pt", metrics={}).ui_command()
    assert hint == expected.format(mlflow=mlflow_executable())


def test_the_hint_runs_the_mlflow_of_this_environment(tmp_path, monkeypatch):
    """Printed relative to the working directory inside it (`.venv/bin/mlflow` from the repository)."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "mlflow").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    assert mlflow_executable() == ".venv/bin/mlflow"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert mlflow_executable() == str(bin_dir / "mlflow")
