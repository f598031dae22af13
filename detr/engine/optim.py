"""Optimizer parameter groups and the learning-rate schedule.

DETR trains the backbone with a 10x smaller lr; Deformable DETR also scales the lr of the sampling
offsets and reference-point projections (``lr_linear_proj_mult``) because large early updates of
the sampling locations destabilise training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Parameter-name fragments of Deformable DETR's location-predicting projections.
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def build_param_groups(
    model: nn.Module, *, lr: float, lr_backbone: float, lr_linear_proj_mult: float
) -> list[dict]:
    """Three groups (rest, backbone, location projections); frozen parameters are left out."""
    groups: dict[str, list[nn.Parameter]] = {"default": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(param)
        elif any(fragment in name for fragment in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(param)
        else:
            groups["default"].append(param)
    lrs = {"default": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [
        {"params": params, "lr": lrs[name], "name": name}
        for name, params in groups.items()
        if params
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, lr_backbone: float, lr_linear_proj_mult: float, weight_decay: float
) -> torch.optim.AdamW:
    groups = build_param_groups(model, lr=lr, lr_backbone=lr_backbone, lr_linear_proj_mult=lr_linear_proj_mult)
    # The fused kernel updates every tensor in one pass: 5x faster than the per-tensor loop on CPU
    # (9 ms against 50 ms per step for the tiny Deformable DETR), a few % of a training step.
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


def lr_factor(
    step: int,
    *,
    kind: str,
    steps_per_epoch: int,
    total_steps: int,
    milestones: Sequence[int],
    gamma: float,
    warmup_steps: int,
    min_lr_ratio: float,
) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps (linear warmup, then step or cosine)."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if kind == "step":
        epoch = step // max(steps_per_epoch, 1)
        return warmup * gamma ** sum(epoch >= m for m in milestones)
    if kind == "cosine":
        progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
        return warmup * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"Invalid lr schedule {kind!r}. Only 'step' and 'cosine' are supported.")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    kind: str,
    steps_per_epoch: int,
    epochs: int,
    milestones: Sequence[int],
    gamma: float,
    warmup_steps: int,
    min_lr_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step schedule; its state (last step) goes into checkpoints."""
    total = steps_per_epoch * epochs

    def factor(step: int) -> float:
        return lr_factor(step, kind=kind, steps_per_epoch=steps_per_epoch, total_steps=total,
                         milestones=milestones, gamma=gamma, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
