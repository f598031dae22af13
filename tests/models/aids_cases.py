"""Tiny models with training aids, shared by the test_aids_* modules."""

from __future__ import annotations

import torch

from detr.config import ModelConfig
from detr.models.build import build_criterion, build_model

# hidden 32 (Deformable DETR's GroupNorm needs a multiple of 32), 2 decoder layers so that the
# auxiliary outputs are covered, 3 queries: a 96-pixel image gives DETR's stride-32 map 9 positions,
# room for the 3 matching and 4 one-to-many proposals of two-stage DETR.
BASE = {
    "backbone": {"name": "resnet18", "trainable_layers": 5, "frozen_batchnorm": True},
    "hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 32,
    "num_queries": 3, "dropout": 0.0,
}
IMAGE = 96
NUM_CLASSES = 3

DENOISING = {"enabled": True, "groups": 2, "label_noise_ratio": 0.5, "box_noise_scale": 1.0, "contrastive": True}
ONE_TO_MANY = {"num_queries": 4, "repeats": 2}

# Every query path with every aid it supports.
CASES = {
    "detr": {"arch": "detr", "training_aids": {"query_groups": 3, "one_to_many": ONE_TO_MANY}},
    "detr_two_stage": {"arch": "detr", "detr": {"two_stage": True},
                       "training_aids": {"denoising": DENOISING, "one_to_many": ONE_TO_MANY}},
    "deformable": {"arch": "deformable_detr", "deformable": {"n_levels": 2, "n_points": 2},
                   "training_aids": {"query_groups": 3, "one_to_many": ONE_TO_MANY}},
    "deformable_two_stage": {"arch": "deformable_detr",
                             "deformable": {"n_levels": 2, "n_points": 2, "with_box_refine": True, "two_stage": True},
                             "training_aids": {"denoising": DENOISING, "one_to_many": ONE_TO_MANY}},
    # The tiny preset's query path: proposals whose content carries the encoder feature.
    "deformable_two_stage_encoder_content": {
        "arch": "deformable_detr",
        "deformable": {"n_levels": 2, "n_points": 2, "with_box_refine": True, "two_stage": True,
                       "encoder_content": True},
        "training_aids": {"denoising": DENOISING, "one_to_many": ONE_TO_MANY}},
}


def config(case: str, *, aids: bool = True, **changes) -> ModelConfig:
    raw = {**BASE, **CASES[case], **changes}
    if not aids:
        raw.pop("training_aids")
    return ModelConfig.model_validate(raw)


def model(case: str, *, aids: bool = True, seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config(case, aids=aids, **changes), NUM_CLASSES)


def criterion(case: str, **changes):
    return build_criterion(config(case, **changes), NUM_CLASSES)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))
