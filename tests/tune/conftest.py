"""Fixtures of the search tests: the micro model of the training tests on a generated dataset,
and a tracking store whose artifacts stay in the test's directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from detr.config import Config, load_config
from tests.engine.test_training import micro_overrides

EXPERIMENT = "search-tests"


@pytest.fixture(scope="session")
def micro_data(micro_synth_dir) -> Path:
    """The shared micro dataset (tests/conftest.py): 9 train, 3 val images."""
    return micro_synth_dir


def micro_search_config(data: Path, tmp_path: Path, tracking_uri: str, **extra) -> Config:
    """The micro DETR (a few seconds per epoch on one core), three epochs, tracked in ``tracking_uri``."""
    overrides = micro_overrides(data, tmp_path / "unused-checkpoints", **{
        "train.epochs": 3, "train.device": "cpu", "tracking.tracking_uri": tracking_uri,
        "tracking.experiment": EXPERIMENT, **extra})
    return load_config(None, overrides)


@pytest.fixture
def tracking_uri(tmp_path) -> Iterator[str]:
    """A SQLite store in ``tmp_path``; the process's tracking URI is put back afterwards (the search
    points MLflow at the config's store)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Created up front so that the artifacts go to tmp_path, not ./mlruns of the working directory.
    mlflow.MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "artifacts"))
    previous = mlflow.get_tracking_uri()
    yield uri
    mlflow.set_tracking_uri(previous)
