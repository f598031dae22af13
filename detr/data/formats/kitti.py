"""KITTI object (2D boxes) labels: reading and writing.

Layout::

    <root>/<split>/image_2/<id>.png   images (any common image suffix)
    <root>/<split>/label_2/<id>.txt   one line per object, 15 fields (16 with a score):
        type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]
    <root>/labels.txt                 optional: class names in label-id order (written by us)

A split is any subdirectory with a ``label_2/`` directory; the official download has one, named
``training`` (``testing`` has no labels and is not a split). A path that itself holds ``image_2/``
and ``label_2/`` is read as one split named after the directory.

Mapping: ``x1 y1 x2 y2`` are 0-based pixel coordinates used as they are; ``truncated`` (0..1) and
``occluded`` (0 visible, 1 partly, 2 largely occluded, 3 unknown) are box attributes; ``alpha``,
dimensions, location, ``rotation_y`` and the optional score go to ``extras`` (``kitti_*``) and are
written back unchanged (left out of a record whose objects hold only KITTI's placeholders for them,
``-10``, ``-1 -1 -1``, ``-1000 -1000 -1000``, ``-10``, as 2D-only labels do). ``DontCare`` lines become ``ignore_regions``; only their box is carried
(KITTI fills their other fields with placeholders, which the writer writes again). Image sizes come
from the image headers (the labels have none), so ``check_images=False`` still opens each header.
An image without a label file has no objects (counted in the notes); a label file without an image
is an error. Image ids are the file stems.

Class order: ``labels.txt`` when present (a type not in it is an error), else the canonical KITTI
order [Car, Van, Truck, Pedestrian, Person_sitting, Cyclist, Tram, Misc] filtered to the classes
present, followed by any other names sorted. Writing objects of a class without a KITTI field for
occlusion writes ``occluded = 3`` (unknown); whitespace in a class name becomes ``_`` (counted).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from detr.data.dataset import DatasetReport, DetectionDataset, ReportBuilder, concatenate
from detr.data.formats.voc import LABELS_FILE, read_labels_file, write_labels_file
from detr.data.formats.writing import (
    LossCounter,
    float32_text,
    number,
    place_image,
    refuse_existing,
    unique_file_names,
)
from detr.data.formats.yolo import IMAGE_SUFFIXES
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.validate import BoxChecker, check_unique, read_image_size, read_text
from detr.errors import DatasetFormatError

KITTI_CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")
DONT_CARE = "DontCare"
FIELDS = ("type", "truncated", "occluded", "alpha", "x1", "y1", "x2", "y2", "height", "width",
          "length", "x", "y", "z", "rotation_y", "score")
# Placeholder values of the fields KITTI leaves undefined (DontCare lines, unknown 3D box).
PLACEHOLDER_ALPHA, PLACEHOLDER_DIMENSION, PLACEHOLDER_LOCATION, PLACEHOLDER_ROTATION = -10.0, -1.0, -1000.0, -10.0


def _split_dirs(root: Path) -> dict[str, Path]:
    if (root / "label_2").is_dir():
        return {root.name: root}
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "label_2").is_dir()}


def list_splits(root: Path) -> list[str]:
    return list(_split_dirs(root))


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def read(
    root: Path, split: str | None, *, checker: BoxChecker, report: ReportBuilder, check_images: bool
) -> DetectionDataset:
    dirs = _split_dirs(root)
    if not dirs:
        raise DatasetFormatError(f"{root}: no <split>/label_2/ directory (expected a KITTI layout)")
    if split is not None:
        if split not in dirs:
            raise DatasetFormatError(f"{root}: no KITTI split {split!r}; available splits: {sorted(dirs)}")
        dirs = {split: dirs[split]}
    given = read_labels_file(root / LABELS_FILE)
    if given is None and (root / "label_2").is_dir():  # a split directory: labels.txt is beside it
        given = read_labels_file(root.parent / LABELS_FILE)
    parsed = {name: _parse_split(folder, report) for name, folder in dirs.items()}
    names = {n for items in parsed.values() for item in items for n in item["names"]}
    label_map = given if given is not None else LabelMap(
        tuple(c for c in KITTI_CLASSES if c in names) + tuple(sorted(names - set(KITTI_CLASSES)))
    )
    parts = [
        DetectionDataset(
            tuple(_record(item, label_map, checker) for item in items), label_map, f"{root.name}:{name}", "kitti"
        )
        for name, items in parsed.items()
    ]
    if len(parts) == 1:
        return parts[0]
    return concatenate(parts, list(parsed), name=root.name)


def _parse_split(folder: Path, report: ReportBuilder) -> list[dict]:
    image_dir, label_dir = folder / "image_2", folder / "label_2"
    images = sorted(p for p in image_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if image_dir.is_dir() else []
    check_unique([p.stem for p in images], [str(p) for p in images], "image id (file stem)")
    stems = {p.stem for p in images}
    for label in sorted(label_dir.glob("*.txt")):
        if label.stem not in stems:
            raise DatasetFormatError(f"{label}: label file without an image (no {label.stem}.* in {image_dir})")
    items, unlabelled = [], 0
    for image in tqdm(images, desc=f"reading {folder.name}", unit="img", disable=None, leave=False):
        label = label_dir / f"{image.stem}.txt"
        width, height = read_image_size(image, referenced_by=str(label))
        if not label.is_file():
            unlabelled += 1
        items.append(_parse_file(label, image, width, height))
    if unlabelled:
        report.note(f"{folder.name}: {unlabelled} images have no label file (read as images without objects)")
    return items


def _parse_file(label: Path, image: Path, width: int, height: int) -> dict:
    item = {"image": image, "label": label, "width": width, "height": height,
            "names": [], "values": [], "scores": [], "sources": [], "ignore": [], "ignore_sources": []}
    if not label.is_file():
        return item
    for line_no, line in enumerate(read_text(label).splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) not in (15, 16):
            raise DatasetFormatError(
                f"{label}:{line_no}: expected 15 fields ({' '.join(FIELDS[:15])}) or 16 with a score, "
                f"got {len(tokens)}"
            )
        values = []
        # 14 or 15 values after the type: the score is optional
        for field, token in zip(FIELDS[1:], tokens[1:], strict=False):
            try:
                values.append(float(token))
            except ValueError:
                raise DatasetFormatError(
                    f"{label}:{line_no}: field {field!r} must be a number, got {token!r}"
                ) from None
        at = f"{label}:{line_no}"
        if tokens[0] == DONT_CARE:
            item["ignore"].append(values[3:7])
            item["ignore_sources"].append(f"{at} (DontCare)")
            continue
        truncated, occluded = values[0], values[1]
        if not 0.0 <= truncated <= 1.0:
            raise DatasetFormatError(f"{label}:{line_no}: truncated must be in [0, 1], got {tokens[1]!r}")
        if occluded not in (0, 1, 2, 3):
            raise DatasetFormatError(f"{label}:{line_no}: occluded must be 0, 1, 2 or 3, got {tokens[2]!r}")
        item["names"].append(tokens[0])
        item["values"].append(values[:14])
        item["scores"].append(values[14] if len(values) == 15 else np.nan)
        item["sources"].append(f"{at} ({tokens[0]})")
    return item


def _record(item: dict, label_map: LabelMap, checker: BoxChecker) -> ImageRecord:
    names = zip(item["names"], item["sources"], strict=True)
    labels = np.array([label_map.id_of(n, where=s) for n, s in names], np.int64)
    values = np.asarray(item["values"], dtype=np.float64).reshape(-1, 14)
    boxes, keep = checker.check(values[:, 3:7], item["width"], item["height"], item["sources"])
    ignore, _ = checker.check(np.asarray(item["ignore"], np.float64).reshape(-1, 4), item["width"], item["height"],
                              item["ignore_sources"])
    kept = values[keep].astype(np.float32)
    return ImageRecord(
        image_path=item["image"],
        width=item["width"],
        height=item["height"],
        boxes=boxes,
        labels=labels[keep],
        box_sources=tuple(s for s, k in zip(item["sources"], keep, strict=True) if k),
        source=str(item["label"]),
        image_id=item["image"].stem,
        attributes={"truncated": kept[:, 0], "occluded": values[keep, 1].astype(np.int64)},
        ignore_regions=ignore,
        extras=_extras(kept, np.asarray(item["scores"], np.float32)[keep]),
    )


def _extras(kept: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """The 3D fields and scores of the kept objects ([M, 14] values after the type), left out when
    they only hold KITTI's placeholders (2D-only labels): the writer writes those back anyway."""
    extras = {}
    placeholders = np.array([PLACEHOLDER_ALPHA, *[PLACEHOLDER_DIMENSION] * 3, *[PLACEHOLDER_LOCATION] * 3,
                             PLACEHOLDER_ROTATION], np.float32)
    if not (kept[:, [2, 7, 8, 9, 10, 11, 12, 13]] == placeholders).all():
        extras.update(kitti_alpha=kept[:, 2], kitti_dimensions=kept[:, 7:10], kitti_location=kept[:, 10:13],
                      kitti_rotation_y=kept[:, 13])
    if np.isfinite(scores).any():
        extras["kitti_score"] = scores
    return extras


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def write(dataset: DetectionDataset, out_dir: Path, split: str, images: str) -> DatasetReport:
    """Write ``<split>/image_2/``, ``<split>/label_2/`` and ``labels.txt``."""
    label_dir = out_dir / split / "label_2"
    refuse_existing(label_dir, split)
    file_names = unique_file_names(dataset, split)
    check_unique([Path(n).stem for n in file_names], file_names, "image file stem (KITTI label file name)")
    report = ReportBuilder()
    type_names = []
    for name in dataset.label_map.names:
        safe = "_".join(name.split())
        if safe != name:
            report.note(f"class {name!r} written as KITTI type {safe!r} (types cannot contain whitespace)")
        type_names.append(safe)
    write_labels_file(out_dir / LABELS_FILE, LabelMap(tuple(type_names)))
    losses = LossCounter("KITTI", attributes=("truncated", "occluded"), extras_prefix="kitti_", ignore_regions=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for record, file_name in zip(dataset.records, file_names, strict=True):
        losses.visit(record)
        lines = _object_lines(record, type_names) + _dont_care_lines(record.ignore_regions)
        (label_dir / f"{Path(file_name).stem}.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        place_image(record.image_path, out_dir / split / "image_2" / file_name, images)
    (out_dir / split / "image_2").mkdir(parents=True, exist_ok=True)
    report.extend(losses.build())
    return report.build()


def _object_lines(record: ImageRecord, type_names: list[str]) -> list[str]:
    n = record.num_boxes
    extras, attrs = record.extras, record.attributes

    def column(key: str, fill: float, width: int = 0) -> np.ndarray:
        shape = (n, width) if width else (n,)
        values = extras.get(key)
        return np.asarray(values, np.float32) if values is not None else np.full(shape, fill, np.float32)

    truncated = attrs.get("truncated", np.zeros(n, np.float32))
    occluded = attrs.get("occluded", np.full(n, 3, np.int64))
    alpha = column("kitti_alpha", PLACEHOLDER_ALPHA)
    dims = column("kitti_dimensions", PLACEHOLDER_DIMENSION, 3)
    location = column("kitti_location", PLACEHOLDER_LOCATION, 3)
    rotation = column("kitti_rotation_y", PLACEHOLDER_ROTATION)
    score = column("kitti_score", np.nan)
    # [N, 4] box, [N, 8] alpha + dimensions + location + rotation_y: shortest exact decimals
    box_text = float32_text(record.boxes)
    other_text = float32_text(np.concatenate([alpha[:, None], dims, location, rotation[:, None]], 1))
    truncated_text = float32_text(truncated)
    score_text = float32_text(np.nan_to_num(score))
    lines = []
    for j in range(n):
        fields = [type_names[int(record.labels[j])], number(truncated_text[j]), str(int(occluded[j])),
                  number(other_text[j, 0]), *map(number, box_text[j]), *map(number, other_text[j, 1:])]
        if np.isfinite(score[j]):
            fields.append(number(score_text[j]))
        lines.append(" ".join(fields))
    return lines


def _dont_care_lines(regions: np.ndarray) -> list[str]:
    text = float32_text(regions)  # [R, 4]
    return [f"{DONT_CARE} -1 -1 -10 " + " ".join(map(number, row)) + " -1 -1 -1 -1000 -1000 -1000 -10"
            for row in text]
