"""Every rank continues its own random stream after a resume.

The ranks of a data-parallel run start from one seed but draw different amounts (dropout over
tensors of their own images' shapes, denoising noise per target), so a checkpoint holds every rank's
state (``rng_ranks``) and each rank restores its own. Two gloo processes check it through a real
checkpoint file; restoring rank 0's stream on rank 1 (what a rank-0-only checkpoint gave) must not
pass the same check.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr.checkpoints.format import load_checkpoint, save_checkpoint
from detr.engine.state import capture_rng_state, gather_rng_states, restore_own_rng_state, restore_rng_state


def _rank(rank: int, port: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)                 # one seed for both ranks, as training does
        torch.rand(5 + 7 * rank)             # ... which then draw different amounts
        states = gather_rng_states()         # collective: both ranks, same point
        expected = torch.rand(4)             # what this rank draws next, uninterrupted
        path = Path(directory) / f"rank{rank}.pt"
        save_checkpoint(path, {"rng": states[0], "rng_ranks": states})
        assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])

        torch.manual_seed(123)               # a restarted process: a fresh stream
        restore_own_rng_state(load_checkpoint(path))
        assert torch.equal(torch.rand(4), expected), f"rank {rank} did not continue its own stream"
        restore_rng_state(load_checkpoint(path)["rng"])  # rank 0's stream: right on rank 0 only
        assert torch.equal(torch.rand(4), expected) == (rank == 0)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_rank_restores_its_own_stream(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)


def test_without_a_process_group_the_checkpoint_holds_one_stream(tmp_path):
    torch.manual_seed(7)
    states = gather_rng_states()
    assert len(states) == 1 and torch.equal(states[0]["torch"], capture_rng_state()["torch"])
    expected = torch.rand(3)
    save_checkpoint(tmp_path / "one.pt", {"rng": states[0]})  # as a single-process trainer writes it
    torch.manual_seed(8)
    restore_own_rng_state(load_checkpoint(tmp_path / "one.pt"))
    assert torch.equal(torch.rand(3), expected)
