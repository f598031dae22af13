"""Checkpoint files: atomic writes, weights_only loading, clear errors, RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from detr.checkpoints.format import CheckpointDirectory, load_checkpoint, save_checkpoint
from detr.engine.state import capture_rng_state, restore_rng_state
from detr.errors import CheckpointError


def test_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "config": {"a": [1, 2]}})
    data = load_checkpoint(path)
    assert torch.equal(data["model"]["weight"], model.weight)
    assert data["config"] == {"a": [1, 2]}
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(2)})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"x": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_and_foreign_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="detr convert"):
        load_checkpoint(foreign)


class Evil:
    """A class weights_only unpickling must refuse to construct."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "mlflow-detr-checkpoint", "format_version": 1, "obj": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_rng_state_survives_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path / "r.pt", {"rng": capture_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_directory_keeps_last_k_and_best(tmp_path):
    directory = CheckpointDirectory(tmp_path, keep_last=2, metric="coco/AP", mode="max")
    for step in (1, 2, 3):
        directory.save({"step": step}, step)
    assert [p.name for p in directory.step_checkpoints()] == ["step-00000002.pt", "step-00000003.pt"]
    assert directory.latest() == directory.step_path(3)
    assert directory.is_better(0.1, None) and directory.is_better(0.2, 0.1)
    assert not directory.is_better(0.1, 0.2) and not directory.is_better(float("nan"), 0.1)
    low = CheckpointDirectory(tmp_path, keep_last=1, metric="loss", mode="min")
    assert low.is_better(0.1, 0.2)


@pytest.fixture
def sigint_handler():
    """Set SIGINT's handler for one test (a shell starts background jobs with SIGINT ignored)."""
    import signal

    original = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, original)


def sigint_during_torch_save(monkeypatch) -> None:
    import os
    import signal

    real_save = torch.save

    def save_then_sigint(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the write
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_then_sigint)


def test_ctrl_c_during_a_write_completes_the_file_then_interrupts(tmp_path, monkeypatch, sigint_handler):
    import signal

    sigint_handler(signal.default_int_handler)  # Python's own: Ctrl-C raises KeyboardInterrupt
    sigint_during_torch_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["x"], torch.ones(3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored_around_a_write(tmp_path, monkeypatch, sigint_handler):
    import signal

    sigint_handler(signal.SIG_IGN)  # e.g. started with nohup or as a background job
    sigint_during_torch_save(monkeypatch)
    save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(3)})  # no KeyboardInterrupt
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["x"], torch.ones(3))
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
