"""Distributed data parallel through ``torchrun`` (gloo on CPU).

Two processes at batch B must train the same weights as one process at batch 2B: the sampler gives
rank r every other index of the epoch's permutation (so step k of both set-ups sees the same 2B
images), each image's augmentation is seeded by (seed, epoch, index), the criterion averages the box
count over processes, and DDP averages gradients. What makes the two set-ups differ is kept out of
the model on purpose, each for a reason that is not a DDP bug:

* BatchNorm statistics of a batch of B differ from those of 2B: the backbone uses frozen BatchNorm;
* images padded to the largest of a batch see different borders at B and 2B: one fixed size;
* dropout draws different masks: 0;
* DETR's cross-entropy is a mean weighted by ``eos_coef`` whose denominator depends on how many
  predictions of a process are matched; with ``eos_coef=1`` it is a plain mean over B x Q
  predictions, and the mean of the processes' means is the mean over 2B.

What remains is float summation order, orders of magnitude below what one training step moves.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from detr.checkpoints.format import load_checkpoint
from detr.config import load_config
from detr.run import train_from_config
from tests.engine.conftest import SMALL_NUM_TRAIN as NUM_TRAIN
from tests.engine.conftest import SMALL_NUM_VAL as NUM_VAL

PER_PROCESS_BATCH = 2


def ddp_overrides(small_synth_dir: Path, checkpoint_dir: Path, batch_size: int) -> list[str]:
    """A micro DETR whose result does not depend on how a batch is split (see the module docstring)."""
    fixed_size = "{name: resize, args: {size: 64, max_size: 80}}"  # the 96x96 images all become 64x64
    overrides = {
        "data.train": f"{{sources: [{{path: {small_synth_dir}, format: coco, split: train}}]}}",
        "data.val": f"{{sources: [{{path: {small_synth_dir}, format: coco, split: val}}]}}",
        "data.transforms.train": f"[{{name: random_horizontal_flip, args: {{p: 0.5}}}}, {fixed_size}, "
                                 "{name: normalize}]",
        "data.transforms.val": f"[{fixed_size}, {{name: normalize}}]",
        "model.backbone.name": "resnet18",
        "model.backbone.trainable_layers": 1,
        "model.backbone.frozen_batchnorm": "true",
        "model.hidden_dim": 32,
        "model.nheads": 4,
        "model.enc_layers": 1,
        "model.dec_layers": 2,
        "model.dim_feedforward": 64,
        "model.num_queries": 6,
        "model.dropout": 0.0,
        "model.loss.eos_coef": 1.0,
        "train.batch_size": batch_size,
        "train.epochs": 2,
        "train.seed": 7,
        "train.device": "cpu",
        "train.checkpoint.dir": str(checkpoint_dir),
        "train.checkpoint.keep_last": 10,
        "tracking.experiment": "ddp",
        "tracking.log_system_metrics": "false",
        "tracking.num_overlay_images": 0,
    }
    return [f"{k}={v}" for k, v in overrides.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported by every Python process that has this directory on PYTHONPATH: in the torchrun workers
# (which have RANK set) it records, through an audit hook, every file opened for writing or renamed
# into the watched directory, with the rank that did it. Independent of the code under test.
WRITE_RECORDER = textwrap.dedent('''
    import os
    import sys

    _log, _watch, _rank = os.environ.get("WRITE_LOG"), os.environ.get("WATCH_DIR"), os.environ.get("RANK")
    if _log and _watch and _rank is not None:
        _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(_fd, f"{_rank} started -\\n".encode())
        _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _record(event, args):
            if event == "open":
                path, mode, flags = args
                writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            elif event == "os.rename":
                path, writes = args[1], True
            else:
                return
            if writes and isinstance(path, (str, bytes)) and os.fsdecode(path).startswith(_watch):
                os.write(_fd, f"{_rank} {event} {os.fsdecode(path)}\\n".encode())

        sys.addaudithook(_record)
''')


def final_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(sorted(checkpoint_dir.glob("step-*.pt"))[-1])["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_two_processes_at_batch_b_train_like_one_process_at_2b(small_synth_dir, tmp_path):
    # -- two processes, batch 2 each, tracked in MLflow -----------------------------------------
    ddp_dir = tmp_path / "ddp"
    hooks, write_log = tmp_path / "hooks", tmp_path / "writes.log"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WRITE_RECORDER)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
        "WRITE_LOG": str(write_log),
        "WATCH_DIR": str(ddp_dir),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "detr.cli", "train",
               *[arg for o in ddp_overrides(small_synth_dir, ddp_dir, PER_PROCESS_BATCH) for arg in ("-o", o)]]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    # -- the references, in this process: one process at 2B and at B ---------------------------
    single_2b, single_b = tmp_path / "single_2b", tmp_path / "single_b"
    for directory, batch_size in ((single_2b, 2 * PER_PROCESS_BATCH), (single_b, PER_PROCESS_BATCH)):
        config = load_config(None, ddp_overrides(small_synth_dir, directory, batch_size))
        train_from_config(config, track=False, progress=False)

    # Same number of optimizer steps as one process at 2B: the epoch is split, not repeated.
    steps_per_epoch = NUM_TRAIN // (2 * PER_PROCESS_BATCH)
    assert sorted(p.name for p in ddp_dir.glob("step-*.pt")) == [
        f"step-{steps_per_epoch:08d}.pt", f"step-{2 * steps_per_epoch:08d}.pt"]
    ddp_gap = max_difference(final_weights(ddp_dir), final_weights(single_2b))
    batch_gap = max_difference(final_weights(single_b), final_weights(single_2b))
    # Not synchronising gradients (each rank stepping on its own half) or normalising by the local
    # box count moves weights by about one Adam step (~lr); summation order by ~1e-7.
    assert ddp_gap < 1e-5, f"2 processes x {PER_PROCESS_BATCH} vs 1 x {2 * PER_PROCESS_BATCH}: max |dw| {ddp_gap}"
    assert ddp_gap < batch_gap / 100, (ddp_gap, batch_gap)

    # Validation images were split across the ranks and gathered: each counted once.
    last = load_checkpoint(sorted(ddp_dir.glob("step-*.pt"))[-1])
    assert last["training_state"]["metrics"]["eval/images"] == NUM_VAL
    # Each rank's random stream is in the checkpoint, for a resume in which each continues its own.
    assert len(last["rng_ranks"]) == 2 and torch.equal(last["rng_ranks"][0]["torch"], last["rng"]["torch"])

    # -- only rank 0 writes checkpoints and logs -------------------------------------------------
    records = [line.split(" ", 2) for line in write_log.read_text().splitlines()]
    assert {rank for rank, event, _ in records if event == "started"} == {"0", "1"}
    writers = {rank for rank, event, _ in records if event != "started"}
    assert writers == {"0"}, f"checkpoint files written by ranks {writers}"
    renamed = [Path(path).name for rank, event, path in records if event == "os.rename"]
    assert set(renamed) == {p.name for p in ddp_dir.glob("*.pt")}
    step_files = sorted(name for name in renamed if name.startswith("step-"))
    assert step_files == sorted(p.name for p in ddp_dir.glob("step-*.pt")), "each step checkpoint written once"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("ddp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs; only rank 0 may log"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == str(PER_PROCESS_BATCH)
    assert run.data.metrics["epoch"] == 2.0
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 1
