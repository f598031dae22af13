"""Distributed data parallel set-up: from the ``torchrun`` environment, or a process group that a
launcher already made (Ray Train's ``TorchTrainer`` starts one in each of its workers).

``torchrun --nproc-per-node N -m detr.cli train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address, and this module joins the group; under Ray Train (``detr train --workers N``,
``detr.search.ray_train``) the group exists before the training code runs, and this module only
reads rank and world size from it and leaves it to Ray to destroy. A plain ``detr train`` has
neither and runs as a single process. The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Whether the process group was made here (then destroyed here too): a group that a launcher made
# belongs to the launcher, which destroys it when its workers stop.
_owns_process_group = False


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistributedContext:
    """The process group this process trains in: the one a launcher made, the one torchrun's
    environment describes (joined here), or none (a single process)."""
    global _owns_process_group
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    _owns_process_group = True
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown_distributed() -> None:
    """Destroy the process group if it was made here; a launcher's group stays for its launcher."""
    global _owns_process_group
    if _owns_process_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
