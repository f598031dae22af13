"""Fixtures shared by several test packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from detr.data.synth import generate_synthetic_dataset


@pytest.fixture(scope="session")
def micro_synth_dir(tmp_path_factory) -> Path:
    """12 generated shapes images of 96x96 in COCO layout: 9 train (3 steps of 3), 3 val. Read only:
    the training and the search tests share it."""
    out = tmp_path_factory.mktemp("data") / "synth"
    generate_synthetic_dataset(out, format="coco", num_images=12, seed=3, image_size=(96, 96), val_fraction=0.25,
                               progress=False)
    return out
