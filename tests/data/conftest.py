"""Small datasets in each format, written by hand (not by our writers) with real image files.

Each fixture returns the dataset directory; the module-level ``EXPECTED_*`` constants hold what a
correct reader must produce from it, computed from the format's definition rather than our code.
Tests reach the constants and writers through the ``fixtures`` fixture (this module), since
importing ``conftest`` by name is ambiguous when several test directories have one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detr.data import DetectionDataset, ImageRecord, LabelMap


def make_image(path: Path, width: int, height: int) -> Path:
    """A real image file (format from the suffix) with a size-dependent colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (width % 256, height % 256, 90)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# COCO: categories with non-contiguous ids in a non-sorted order; a crowd box; an image without
# annotations; two splits.
# ---------------------------------------------------------------------------------------------

COCO_CATEGORIES = [{"id": 3, "name": "dog", "supercategory": "animal"}, {"id": 1, "name": "cat"},
                   {"id": 7, "name": "bird"}]
COCO_TRAIN = {
    "info": {"description": "fixture"},
    "images": [
        {"id": 10, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 11, "file_name": "b.jpg", "width": 80, "height": 60},
        {"id": 12, "file_name": "c.jpg", "width": 32, "height": 32},
    ],
    "annotations": [
        {"id": 100, "image_id": 10, "category_id": 1, "bbox": [2, 3, 10, 20], "area": 200, "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 23]]},
        {"id": 101, "image_id": 11, "category_id": 7, "bbox": [0, 0, 80, 60], "area": 4800.0, "iscrowd": 1,
         "segmentation": {"size": [60, 80], "counts": "abc"}},
        {"id": 102, "image_id": 10, "category_id": 3, "bbox": [30.5, 10.25, 20, 12.5], "area": 250.0,
         "iscrowd": 0},
        {"id": 103, "image_id": 11, "category_id": 3, "bbox": [5, 6, 7, 8], "area": 56.0, "iscrowd": 0,
         "attributes": {"color": "brown"}},
    ],
    "categories": COCO_CATEGORIES,
}
COCO_VAL = {
    "images": [{"id": 20, "file_name": "d.png", "width": 40, "height": 30}],
    "annotations": [{"id": 200, "image_id": 20, "category_id": 1, "bbox": [1, 1, 38, 28], "area": 1064.0,
                     "iscrowd": 0}],
    "categories": COCO_CATEGORIES,
}
# image id -> (xyxy boxes, labels, iscrowd) in file order; labels index [dog, cat, bird].
EXPECTED_COCO = {
    10: ([[2, 3, 12, 23], [30.5, 10.25, 50.5, 22.75]], [1, 0], [False, False]),
    11: ([[0, 0, 80, 60], [5, 6, 12, 14]], [2, 0], [True, False]),
    12: ([], [], []),
    20: ([[1, 1, 39, 29]], [1], [False]),
}


def write_coco(root: Path, splits: dict[str, dict]) -> Path:
    for split, data in splits.items():
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(data, indent=1))
        for image in data["images"]:
            make_image(root / "images" / split / image["file_name"], image["width"], image["height"])
    return root


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco", {"train": json.loads(json.dumps(COCO_TRAIN)),
                                          "val": json.loads(json.dumps(COCO_VAL))})


# ---------------------------------------------------------------------------------------------
# VOC: 1-based coordinates, difficult/truncated/occluded, per-class lists that are not splits,
# trainval overlapping train and val.
# ---------------------------------------------------------------------------------------------

VOC_OBJECTS = {
    # id: (width, height, [(name, xmin, ymin, xmax, ymax, difficult, truncated, occluded)])
    "000001": (64, 48, [("dog", 1, 1, 64, 48, 0, 1, 0), ("person", 10, 12, 20, 30, 1, 0, 1)]),
    "000002": (50, 40, [("cat", 5, 6, 25.5, 30, 0, 0, 0)]),
    "000003": (30, 30, []),
}
VOC_SPLITS = {"train": ["000001", "000002"], "val": ["000003"], "trainval": ["000001", "000002", "000003"]}
# labels index VOC_NAMES (the reader maps them into the full VOC class list).
VOC_NAMES = ("cat", "dog", "person")
EXPECTED_VOC = {
    "000001": ([[0, 0, 64, 48], [9, 11, 20, 30]], [1, 2], [False, True], [1, 0], [0, 1]),
    "000002": ([[4, 5, 25.5, 30]], [0], [False], [0], [0]),
    "000003": ([], [], [], [], []),
}


def voc_xml(image_id: str, width: int, height: int, objects: list, *, filename: str | None = None) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{filename or image_id + '.jpg'}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
             "<segmented>0</segmented>"]
    for name, x1, y1, x2, y2, difficult, truncated, occluded in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Left</pose><truncated>{truncated}</truncated>"
            f"<occluded>{occluded}</occluded><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc(root: Path, objects: dict = VOC_OBJECTS, splits: dict = VOC_SPLITS) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for image_id, (width, height, objs) in objects.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, width, height, objs))
        make_image(root / "JPEGImages" / f"{image_id}.jpg", width, height)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets" / "Main" / "dog_train.txt").write_text("000001  1\n000002 -1\n")
    return root


@pytest.fixture
def voc_dir(tmp_path: Path) -> Path:
    return write_voc(tmp_path / "voc")


# ---------------------------------------------------------------------------------------------
# YOLO: data.yaml with names as a dict, normalized boxes, an image without a label file.
# ---------------------------------------------------------------------------------------------

YOLO_NAMES = {0: "square", 1: "circle"}
YOLO_IMAGES = {
    # split: {file: (width, height, label lines or None for no label file)}
    "train": {"p.jpg": (100, 50, ["0 0.5 0.5 0.2 0.4", "1 0.25 0.3 0.5 0.6"]), "q.png": (64, 64, None)},
    "val": {"r.jpg": (40, 80, ["1 0.5 0.5 1 1"])},
}
EXPECTED_YOLO = {
    "p": ([[40, 15, 60, 35], [0, 0, 50, 30]], [0, 1]),
    "q": ([], []),
    "r": ([[0, 0, 40, 80]], [1]),
}


def write_yolo(root: Path, images: dict = YOLO_IMAGES, names=YOLO_NAMES) -> Path:
    config = {"names": names}
    for split, files in images.items():
        config[split] = f"images/{split}"
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for name, (width, height, lines) in files.items():
            make_image(root / "images" / split / name, width, height)
            if lines is not None:
                (root / "labels" / split / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    import yaml

    (root / "data.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture
def yolo_dir(tmp_path: Path) -> Path:
    return write_yolo(tmp_path / "yolo")


# ---------------------------------------------------------------------------------------------
# KITTI: 15 and 16 field lines, DontCare regions, classes outside the canonical list.
# ---------------------------------------------------------------------------------------------

KITTI_LABELS = {
    "000000": (120, 40, [
        "Pedestrian 0.00 0 -0.20 71.00 5.00 82.50 38.00 1.89 0.48 1.20 1.84 1.47 8.41 0.01",
        "Car 0.88 3 -1.55 0.00 10.25 30.00 39.00 1.50 1.60 3.70 -3.00 1.70 5.00 -1.57 0.95",
        "DontCare -1 -1 -10 100.00 2.00 119.00 20.00 -1 -1 -1 -1000 -1000 -1000 -10",
    ]),
    "000001": (80, 60, [
        "Tram 0.10 1 2.00 1.00 2.00 79.00 59.00 3.00 2.50 15.00 0.50 1.00 30.00 2.10",
        "Robot 0.00 2 0.00 5.00 5.00 10.00 10.00 1.00 1.00 1.00 0.00 0.00 10.00 0.00",
    ]),
}
# canonical order filtered to present (Car, Pedestrian, Tram) + others sorted (Robot).
EXPECTED_KITTI = {
    "000000": ([[71, 5, 82.5, 38], [0, 10.25, 30, 39]], [1, 0], [0.0, 0.88], [0, 3], [[100, 2, 119, 20]]),
    "000001": ([[1, 2, 79, 59], [5, 5, 10, 10]], [2, 3], [0.1, 0.0], [1, 2], []),
}


def write_kitti(root: Path, labels: dict = KITTI_LABELS, split: str = "training") -> Path:
    for stem, (width, height, lines) in labels.items():
        make_image(root / split / "image_2" / f"{stem}.png", width, height)
        (root / split / "label_2").mkdir(parents=True, exist_ok=True)
        (root / split / "label_2" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def kitti_dir(tmp_path: Path) -> Path:
    return write_kitti(tmp_path / "kitti")


def make_float_dataset(tmp_path: Path, rng: np.random.Generator, image_ids) -> DetectionDataset:
    """Records with arbitrary float32 boxes (the hard case for writing short but exact text)."""
    records = []
    for k, image_id in enumerate(image_ids):
        width, height = int(rng.integers(20, 700)), int(rng.integers(20, 700))
        path = tmp_path / "src" / (f"{image_id}.png" if isinstance(image_id, str) else f"img{k}.png")
        if not path.exists():
            make_image(path, width, height)
        n = int(rng.integers(0, 6))
        x1 = rng.uniform(0, width - 1, n)
        y1 = rng.uniform(0, height - 1, n)
        boxes = np.stack([x1, y1, rng.uniform(x1 + 0.01, width), rng.uniform(y1 + 0.01, height)], 1)
        boxes = boxes.astype(np.float32).reshape(-1, 4)
        boxes[:, 2] = np.minimum(boxes[:, 2], width)
        boxes[:, 3] = np.minimum(boxes[:, 3], height)
        records.append(ImageRecord(path, width, height, boxes, rng.integers(0, 3, n).astype(np.int64),
                                   tuple(f"box{i}" for i in range(n)), f"img{k}", image_id))
    return DetectionDataset(tuple(records), LabelMap(("b", "a", "c")), "floats", "synthetic")


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------


def assert_same_dataset(a: DetectionDataset, b: DetectionDataset) -> None:
    """Everything a same-format round trip must keep exactly."""
    assert a.label_map.names == b.label_map.names
    assert len(a) == len(b)
    for ra, rb in zip(a.records, b.records, strict=True):
        assert ra.image_id == rb.image_id
        assert ra.image_path.name == rb.image_path.name
        assert (ra.width, ra.height) == (rb.width, rb.height)
        assert ra.boxes.dtype == rb.boxes.dtype == np.float32
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
        np.testing.assert_array_equal(ra.labels, rb.labels)
        assert sorted(ra.attributes) == sorted(rb.attributes)
        for name in ra.attributes:
            np.testing.assert_array_equal(ra.attributes[name], rb.attributes[name])
        np.testing.assert_array_equal(ra.ignore_regions, rb.ignore_regions)


@pytest.fixture
def same_dataset():
    return assert_same_dataset


def assert_matches(record, boxes, labels) -> None:
    np.testing.assert_allclose(record.boxes, np.asarray(boxes, np.float32).reshape(-1, 4), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(record.labels, np.asarray(labels, np.int64))


@pytest.fixture
def matches():
    return assert_matches


@pytest.fixture
def fixtures():
    """This module: the EXPECTED_* constants, write_* functions and comparison helpers."""
    return sys.modules[__name__]
