"""Fixtures for the engine tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detr.data.dataset import DetectionDataset
from detr.data.synth import generate_synthetic_dataset
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord

# ---- training: a generated dataset small enough for many short trainings ---------------------

SMALL_NUM_TRAIN, SMALL_NUM_VAL = 8, 2  # 8 = 2 steps of 2 x 2 images: no padded or short last batch


@pytest.fixture(scope="session")
def small_synth_dir(tmp_path_factory) -> Path:
    """The shapes dataset as generated (1-6 boxes per image), 96x96: SMALL_NUM_TRAIN train and
    SMALL_NUM_VAL val images."""
    out = tmp_path_factory.mktemp("data") / "synth"
    total = SMALL_NUM_TRAIN + SMALL_NUM_VAL
    generate_synthetic_dataset(out, format="coco", num_images=total, seed=3, image_size=(96, 96),
                               val_fraction=SMALL_NUM_VAL / total, progress=False)
    return out


# ---- evaluation: records, datasets and predictions built directly (no format adapter) ----------


def build_record(
    image_id,
    boxes,
    labels,
    *,
    width: int = 200,
    height: int = 200,
    difficult=None,
    iscrowd=None,
    ignore_regions=None,
) -> ImageRecord:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    attributes = {}
    if difficult is not None:
        attributes["difficult"] = np.asarray(difficult, dtype=bool)
    if iscrowd is not None:
        attributes["iscrowd"] = np.asarray(iscrowd, dtype=bool)
    regions = np.zeros((0, 4), np.float32) if ignore_regions is None else np.asarray(ignore_regions, np.float32)
    return ImageRecord(
        image_path=Path(f"/images/{image_id}.jpg"),
        width=width,
        height=height,
        boxes=boxes,
        labels=labels,
        box_sources=tuple(f"test: image {image_id} box {i}" for i in range(len(labels))),
        source=f"test: image {image_id}",
        image_id=image_id,
        attributes=attributes,
        ignore_regions=regions.reshape(-1, 4),
    )


@pytest.fixture
def make_record():
    """``make_record(image_id, boxes, labels, difficult=..., iscrowd=..., ignore_regions=...)``."""
    return build_record


@pytest.fixture
def make_dataset():
    """``make_dataset(records, class_names)`` -> DetectionDataset."""

    def make(records, names) -> DetectionDataset:
        return DetectionDataset(tuple(records), LabelMap(tuple(names)), name="test", format="coco")

    return make


def _random_box(rng, width, height) -> list[float]:
    w, h = rng.integers(4, 120), rng.integers(4, 120)
    x, y = rng.integers(0, width - w), rng.integers(0, height - h)
    return [float(x), float(y), float(x + w), float(y + h)]


@pytest.fixture
def random_problem(make_dataset):
    """``random_problem(seed, ...)`` -> (dataset, predictions): a detection task with every hard case.

    Ground truth: 0..max_gt integer boxes per image, some crowd, difficult or under an ignore
    region (when asked). Predictions: jittered copies of ground truth (mostly the right class),
    random boxes, scores rounded to 2 decimals (ties), some images without detections (unless
    ``fixed_dets`` sets the number per image).
    """

    def make(
        seed: int,
        num_images: int = 30,
        num_classes: int = 4,
        max_gt: int = 6,
        max_dets: int = 40,
        special: bool = True,
        as_tensors: bool = False,
        fixed_dets: int | None = None,
    ):
        import torch

        rng = np.random.default_rng(seed)
        width, height = 320, 240
        records, predictions = [], []
        for i in range(num_images):
            n = int(rng.integers(0, max_gt + 1))
            boxes = [_random_box(rng, width, height) for _ in range(n)]
            labels = rng.integers(0, num_classes, size=n)
            kwargs = {}
            if special:
                kwargs["iscrowd"] = rng.uniform(size=n) < 0.1
                kwargs["difficult"] = rng.uniform(size=n) < 0.1
                if rng.uniform() < 0.3:
                    kwargs["ignore_regions"] = [_random_box(rng, width, height)]
            records.append(build_record(i * 7 + 3, boxes, labels, width=width, height=height, **kwargs))
            det_boxes, det_labels = [], []
            if fixed_dets is not None:
                num_dets = fixed_dets
            else:
                num_dets = int(rng.integers(0, max_dets + 1)) if rng.uniform() > 0.1 else 0
            for _ in range(num_dets):
                if n and rng.uniform() < 0.6:
                    g = int(rng.integers(n))
                    jitter = rng.integers(-8, 9, size=4).astype(float)
                    box = np.asarray(boxes[g]) + jitter
                    box[2:] = np.maximum(box[2:], box[:2] + 1)
                    det_boxes.append(box.tolist())
                    det_labels.append(int(labels[g]) if rng.uniform() < 0.8 else int(rng.integers(num_classes)))
                else:
                    det_boxes.append(_random_box(rng, width, height))
                    det_labels.append(int(rng.integers(num_classes)))
            k = len(det_boxes)
            prediction = {
                "image_id": records[-1].image_id,
                "boxes": np.asarray(det_boxes, dtype=np.float32).reshape(k, 4),
                "scores": np.round(rng.uniform(size=k), 2).astype(np.float32),
                "labels": np.asarray(det_labels, dtype=np.int64).reshape(k),
            }
            if as_tensors:
                prediction = {key: torch.as_tensor(v) if key != "image_id" else v for key, v in prediction.items()}
            predictions.append(prediction)
        dataset = make_dataset(records, [f"class{k}" for k in range(num_classes)])
        return dataset, predictions

    return make
