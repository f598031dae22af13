"""One MLflow run across resumes, against MLflow's file store (no server, no database migrations to
wait for): what ``prepare_continuation`` does to the run it finds, and which (metric, step) pairs
``RunContinuation.fresh`` lets through."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import mlflow
import pytest
from mlflow.entities import Metric

from detr.checkpoints.format import load_checkpoint
from detr.tracking.continuation import (
    PREVIOUS_RUN_TAG,
    REPLAY_MISMATCH_TAG,
    RESUME_COUNT_TAG,
    RESUME_HISTORY_TAG,
    prepare_continuation,
)


@pytest.fixture(scope="module")
def file_store(tmp_path_factory) -> Iterator[tuple[str, mlflow.MlflowClient]]:
    # MLflow 3.13+ refuses the file store unless asked for it explicitly.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = tmp_path_factory.mktemp("mlruns").as_uri()
        yield uri, mlflow.MlflowClient(uri)


@pytest.fixture
def store(file_store, request) -> tuple[str, mlflow.MlflowClient, str]:
    """(tracking URI, client, a new experiment's id)."""
    uri, client = file_store
    return uri, client, client.create_experiment(request.node.name)


def log(client: mlflow.MlflowClient, run_id: str, key: str, values: dict[int, float]) -> None:
    client.log_batch(run_id, metrics=[Metric(key, value, 0, step) for step, value in values.items()])


def test_a_killed_run_is_ended_killed_and_only_unlogged_steps_pass(store):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id  # RUNNING, as a process killed by SIGKILL leaves it
    # Checkpoint at step 2; the process went on logging steps 3 and 4 before it was killed.
    log(client, run_id, "train/loss", {1: 5.0, 2: 4.5, 3: 4.25, 4: 4.125})
    log(client, run_id, "epoch", {3: 1.0})

    continuation = prepare_continuation(run_id, checkpoint_step=2, tracking_uri=uri)

    assert continuation.run_id == run_id and continuation.previous_run_id is None
    assert client.get_run(run_id).info.status == "KILLED"
    assert continuation.history == [{"step": 2, "found": "RUNNING", "ended_as": "KILLED"}]
    assert continuation.tags() == {RESUME_COUNT_TAG: "1", RESUME_HISTORY_TAG: json.dumps(continuation.history)}
    # The replayed step 3: its loss and epoch are in the run already; a key never logged there passes.
    assert continuation.fresh({"train/loss": 4.25, "epoch": 1.0, "train/lr": 1e-4}, 3) == {"train/lr": 1e-4}
    assert continuation.replayed == 2 and continuation.replay_mismatches == 0
    # A replayed value that differs is counted, never logged a second time.
    assert continuation.fresh({"train/loss": 4.0}, 4) == {}
    assert continuation.replay_mismatches == 1
    # Past the kill everything passes, once: a second value for the same step is left out.
    assert continuation.fresh({"train/loss": 3.9}, 5) == {"train/loss": 3.9}
    assert continuation.fresh({"train/loss": 3.9}, 5) == {}
    # The steps logged before the checkpoint are left out too (a resume never goes back further).
    assert continuation.fresh({"train/loss": 5.0}, 1) == {}


def test_an_ended_run_keeps_its_status_and_the_resumes_add_up(store):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    earlier = [{"step": 4, "found": "RUNNING", "ended_as": "KILLED"}]
    client.set_tag(run_id, RESUME_HISTORY_TAG, json.dumps(earlier))
    client.set_tag(run_id, REPLAY_MISMATCH_TAG, "2")
    client.set_terminated(run_id, status="FAILED")  # a crash that the process itself recorded

    continuation = prepare_continuation(run_id, checkpoint_step=8, tracking_uri=uri)

    assert client.get_run(run_id).info.status == "FAILED"
    assert continuation.history == [*earlier, {"step": 8, "found": "FAILED", "ended_as": None}]
    assert continuation.tags()[RESUME_COUNT_TAG] == "2"
    assert continuation.replay_mismatches == 2  # counted over every resume of the run


def test_a_run_that_is_gone_starts_a_new_one_that_names_it(store):
    uri, client, experiment = store
    missing = uuid.uuid4().hex
    continuation = prepare_continuation(missing, checkpoint_step=6, tracking_uri=uri)
    assert continuation.run_id is None and continuation.previous_run_id == missing
    assert continuation.tags()[PREVIOUS_RUN_TAG] == missing
    assert continuation.history == [{"step": 6, "found": "missing", "ended_as": None}]
    assert continuation.fresh({"train/loss": 1.0}, 1) == {"train/loss": 1.0}

    deleted = client.create_run(experiment).info.run_id
    client.delete_run(deleted)
    continuation = prepare_continuation(deleted, checkpoint_step=6, tracking_uri=uri)
    assert continuation.run_id is None and continuation.previous_run_id == deleted
    assert continuation.history[-1]["found"] == "deleted"


def test_a_checkpoint_written_untracked_has_no_run_to_continue(file_store):
    uri, _ = file_store
    assert prepare_continuation(None, checkpoint_step=3, tracking_uri=uri) is None



@pytest.mark.slow
def test_a_resume_whose_run_was_deleted_logs_into_a_new_run_that_names_it(micro_synth_dir, tmp_path, monkeypatch):
    """train_from_config end to end (a SQLite store: the file store cannot hold both ``coco/AP`` and
    ``coco/AP/<class>``): one epoch of 3 steps, its run deleted, a resume from step 2 starts a new
    run with the params, tagged with the deleted run, holding step 3 only."""
    from detr.config import load_config
    from detr.run import train_from_config
    from tests.engine.test_training import micro_overrides

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("in-process", artifact_location=str(tmp_path / "artifacts"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    checkpoints = tmp_path / "checkpoints"
    config = load_config(None, micro_overrides(micro_synth_dir, checkpoints, **{
        "train.epochs": 1, "train.device": "cpu", "train.checkpoint.every_steps": 1, "tracking.tracking_uri": uri,
        "tracking.experiment": "in-process", "tracking.log_every_steps": 1, "tracking.log_system_metrics": "false",
        "tracking.num_overlay_images": 0, "tracking.log_model": "false"}))
    first = train_from_config(config, progress=False)
    client.delete_run(first.run_id)

    again = train_from_config(config, resume=checkpoints / "step-00000002.pt", progress=False)

    assert again.run_id != first.run_id
    new_run = client.get_run(again.run_id)
    assert new_run.info.status == "FINISHED"
    assert new_run.data.tags[PREVIOUS_RUN_TAG] == first.run_id
    assert json.loads(new_run.data.tags[RESUME_HISTORY_TAG]) == [{"step": 2, "found": "deleted", "ended_as": None}]
    assert new_run.data.params["train.batch_size"] == "3"  # a new run gets the params a continued one has
    assert [m.step for m in client.get_metric_history(again.run_id, "train/loss")] == [3]
    # The checkpoints written from now on name the new run: the next resume continues it.
    assert load_checkpoint(sorted(checkpoints.glob("step-*.pt"))[-1])["mlflow_run_id"] == again.run_id
