"""Parameter groups, lr schedules and the resumable sampler."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DistributedSampler

from detr.engine.optim import build_optimizer, build_scheduler, lr_factor
from detr.engine.sampler import ResumableSampler


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(2, 2)
        self.sampling_offsets = torch.nn.Linear(2, 2)
        self.head = torch.nn.Linear(2, 2)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)


def test_param_groups_get_their_learning_rates():
    optimizer = build_optimizer(Toy(), lr=1e-4, lr_backbone=1e-5, lr_linear_proj_mult=0.1, weight_decay=1e-4)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"default": 1e-4, "backbone": 1e-5, "linear_proj": 1e-5})
    counted = sum(len(g["params"]) for g in optimizer.param_groups)
    assert counted == 6  # the frozen layer's 2 tensors are not optimized


def test_step_schedule_with_warmup():
    kwargs = dict(kind="step", steps_per_epoch=10, total_steps=100, milestones=[5, 8], gamma=0.1,
                  warmup_steps=4, min_lr_ratio=0.0)
    assert lr_factor(0, **kwargs) == pytest.approx(0.25)
    assert lr_factor(3, **kwargs) == pytest.approx(1.0)
    assert lr_factor(49, **kwargs) == pytest.approx(1.0)
    assert lr_factor(50, **kwargs) == pytest.approx(0.1)
    assert lr_factor(80, **kwargs) == pytest.approx(0.01)


def test_cosine_schedule_ends_at_min_ratio():
    kwargs = dict(kind="cosine", steps_per_epoch=10, total_steps=100, milestones=[], gamma=0.1,
                  warmup_steps=0, min_lr_ratio=0.1)
    assert lr_factor(0, **kwargs) == pytest.approx(1.0)
    assert lr_factor(50, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, **kwargs) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Only 'step' and 'cosine'"):
        lr_factor(0, **{**kwargs, "kind": "poly"})


def test_scheduler_state_round_trip():
    model = Toy()
    make = lambda opt: build_scheduler(opt, kind="cosine", steps_per_epoch=5, epochs=4, milestones=[],
                                       gamma=0.1, warmup_steps=2, min_lr_ratio=0.0)
    opt = build_optimizer(model, lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1, weight_decay=0)
    sched = make(opt)
    for _ in range(7):
        opt.step(), sched.step()
    opt2 = build_optimizer(model, lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1, weight_decay=0)
    sched2 = make(opt2)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_matches_distributed_sampler_partition(world_size):
    # Same partition rule as torch's DistributedSampler (padding included), different permutation source.
    for rank in range(world_size):
        ours = ResumableSampler(10, shuffle=False, seed=0, rank=rank, world_size=world_size)
        theirs = DistributedSampler(range(10), num_replicas=world_size, rank=rank, shuffle=False)
        assert list(ours) == list(theirs)
        assert len(ours) == len(theirs)


def test_sampler_is_a_function_of_seed_and_epoch_and_resumes():
    sampler = ResumableSampler(20, shuffle=True, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    assert sorted(full) == list(range(20))
    sampler.set_epoch(4)
    assert list(sampler) != full
    sampler.set_epoch(3, start=7)
    assert list(sampler) == full[7:]
    assert len(sampler) == 13
