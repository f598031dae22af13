"""A resumable, distributed-aware sampler.

The order of an epoch is a pure function of (seed, epoch): a seeded permutation, split across
ranks like ``DistributedSampler``. Resuming mid-epoch skips the samples already consumed without
loading them, so a run killed after k batches continues with batch k+1 exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices of one epoch for one rank.

    Args:
        num_items: dataset length.
        shuffle: permute with a generator seeded by ``seed + epoch``.
        seed: base seed, the same on every rank.
        rank, world_size: this process and the number of processes; rank r takes every
            world_size-th index of the (padded) permutation, as ``DistributedSampler``.
    """

    def __init__(self, num_items: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0  # samples of this rank's epoch already consumed

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def epoch_indices(self) -> list[int]:
        """This rank's full index list for the current epoch (before skipping)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        # Pad by repeating the start so every rank gets the same count (DistributedSampler does too).
        total = -(-self.num_items // self.world_size) * self.world_size
        order += order[: total - len(order)]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return -(-self.num_items // self.world_size) - self.start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}
