"""Shared fixtures for the model tests: tiny configs of every variant and synthetic targets."""

from __future__ import annotations

import pytest
import torch

from detr.config import ModelConfig

# Small enough to run a forward/backward in well under a second on 2 CPU cores.
TINY = {
    "backbone": {"name": "resnet18", "trainable_layers": 5, "frozen_batchnorm": True},
    "hidden_dim": 64,
    "nheads": 4,
    "enc_layers": 1,
    "dec_layers": 3,
    "dim_feedforward": 64,
    "num_queries": 8,
    "dropout": 0.0,
}

VARIANTS = {
    "detr": {"arch": "detr"},
    "detr_prenorm_learned": {"arch": "detr", "pre_norm": True, "position_encoding": "learned"},
    # Few queries: the test images give DETR's stride-32 map only 2x3 positions to choose from.
    "detr_two_stage": {"arch": "detr", "detr": {"two_stage": True}, "num_queries": 4},
    "deformable_single_scale": {"arch": "deformable_detr", "deformable": {"n_levels": 1}},
    "deformable_multi_scale": {"arch": "deformable_detr", "deformable": {"n_levels": 4}},
    "deformable_refine": {"arch": "deformable_detr", "deformable": {"with_box_refine": True}},
    "deformable_two_stage": {"arch": "deformable_detr", "deformable": {"with_box_refine": True, "two_stage": True}},
    "deformable_two_stage_no_refine": {"arch": "deformable_detr", "deformable": {"two_stage": True}},
    "deformable_two_stage_encoder_content": {
        "arch": "deformable_detr", "deformable": {"with_box_refine": True, "two_stage": True, "encoder_content": True}},
}


def tiny_model_config(variant: str = "detr", **changes) -> ModelConfig:
    """The tiny config of a variant with top-level fields of ModelConfig replaced by ``changes``."""
    return ModelConfig.model_validate({**TINY, **VARIANTS[variant], **changes})


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_model_config


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


def random_targets(sizes: list[int], num_classes: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One target dict per image: random labels and valid normalized cxcywh boxes inside the image."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in sizes:
        wh = 0.05 + 0.4 * torch.rand(n, 2, generator=g)
        centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centre, wh], 1)})
    return targets


@pytest.fixture(scope="session")
def make_targets():
    return random_targets
