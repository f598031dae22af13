"""YOLO (Ultralytics/Darknet) text labels: reading and writing.

The layouts (``data.yaml``, Roboflow's ``../`` entries, supervision's yaml without splits,
``classes.txt``, Darknet's ``obj.data``) are resolved by :mod:`.yolo_layout`. Label files hold one
``class cx cy w h`` line per box, normalized 0..1.

Rounding: label files hold rounded decimals, so a box touching the border can come back a little
outside the image (5 decimals on a 320 px image: up to 0.0024 px). A corner at most the rounding of
the line's decimals outside the image -- 0.75 x 10^-d of the image size for d decimals (half a unit
of the last digit for the center plus half of that for half the size), and at least
``ROUNDING`` = 1e-6 when the text shows no precision (integers) -- is put on the border and counted in
the report. Farther is an annotation error (or a ``data.repair.clip_boxes_px`` repair).

An image without a label file has no objects (YOLO's background images; counted in the notes). A
label file without an image is an error naming the image paths looked for, and so is a split whose
labels folder is missing when that split is asked for by name (with ``split=None`` such a split,
e.g. an unlabelled ``test``, is skipped and named in the notes). Image sizes always come from the
image headers, since the labels are normalized: ``check_images=False`` still opens each header.
Image ids are the file stems. The writer writes the Ultralytics layout: ``data.yaml`` with ``names``
as a dict and one empty label file for an image without objects. Segment (polygon) labels are not
supported: a line must have exactly 5 fields.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from detr.data.dataset import DatasetReport, DetectionDataset, ReportBuilder, concatenate
from detr.data.formats.writing import (
    LossCounter,
    directory_label_map,
    number,
    place_image,
    shortest_decimals,
    unique_file_names,
)
from detr.data.formats.yolo_layout import (
    CLASSES_FILE,
    CONFIG_FILE,
    IMAGE_SUFFIXES,
    Entry,
    Layout,
    has_labels,
    images_of,
    label_dir,
    label_path,
    names_of,
    read_layout,
    yaml_config,
)
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.validate import BoxChecker, check_unique, read_image_size, read_text
from detr.errors import DatasetFormatError

# Normalized distance outside the image accepted as rounding when the text shows no precision.
ROUNDING = 1e-6


def list_splits(root: Path) -> list[str]:
    """Splits that have labels (an unlabelled ``test`` entry is not a dataset split here)."""
    layout = read_layout(root)
    return [name for name, entries in layout.splits.items() if all(has_labels(e) for e in entries)]


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def read(
    root: Path, split: str | None, *, checker: BoxChecker, report: ReportBuilder, check_images: bool
) -> DetectionDataset:
    layout = read_layout(root)
    where = layout.where
    entries = layout.splits
    if not entries:
        raise DatasetFormatError(
            f"{where}: no splits (expected 'train'/'val' entries, images/<split>/ folders under {layout.root}, "
            "or '<split> = <list>.txt' lines in obj.data)"
        )
    if split is not None:
        if split not in entries:
            raise DatasetFormatError(f"{where}: no YOLO split {split!r}; available splits: {sorted(entries)}")
        entries = {split: entries[split]}
    parts, names = [], []
    for name, split_entries in entries.items():
        problem = _unreadable(split_entries)
        if problem:
            if split is not None:
                raise DatasetFormatError(f"{where}: split {name!r} {problem}")
            report.note(f"split {name!r} skipped: {problem}")
            continue
        parts.append(_read_split(layout, name, split_entries, checker, report))
        names.append(name)
    if not parts:
        raise DatasetFormatError(f"{where}: no split has labels ({'; '.join(report.build().notes)})")
    if len(parts) == 1:
        return parts[0]
    return concatenate(parts, names, name=layout.root.name)


def _unreadable(entries: list[Entry]) -> str:
    """Why a split cannot be read ("" when it can)."""
    for entry in entries:
        if not entry.exists:
            return f"has no images: {entry.describe_missing()}"
        if entry.path.is_dir() and not label_dir(entry.path).is_dir():
            return f"has no label folder {label_dir(entry.path)}"
    return ""


def _read_split(
    layout: Layout, split: str, entries: list[Entry], checker: BoxChecker, report: ReportBuilder
) -> DetectionDataset:
    where = f"{layout.where}: split {split!r}"
    images = [image for entry in entries for image in images_of(entry, where, layout.root)]
    labels = [label_path(image) for image in images]
    check_unique([str(p) for p in labels], [str(p) for p in images], "label file (two images share a stem)")
    check_unique([p.stem for p in images], [str(p) for p in images], "image id (file stem)")
    _check_orphan_labels(layout, entries, labels)
    records, unlabelled = [], 0
    pairs = list(zip(images, labels, strict=True))
    for image, label in tqdm(pairs, desc=f"reading {split}", unit="img", disable=None, leave=False):
        width, height = read_image_size(image, referenced_by=where)
        if not label.is_file():
            unlabelled += 1
        records.append(_record(image, label, width, height, layout.label_map, checker))
    if unlabelled:
        report.note(f"split {split!r}: {unlabelled} images have no label file (read as images without objects)")
    return DetectionDataset(tuple(records), layout.label_map, f"{layout.root.name}:{split}", "yolo")


def _check_orphan_labels(layout: Layout, entries: list[Entry], labels: list[Path]) -> None:
    """A label file in a split's label folders that belongs to no image is an error: its boxes would
    be lost silently. Files of the layout itself (lists, class names) are not labels."""
    expected = set(labels)
    own_files = {layout.root / CLASSES_FILE, *(e.path for es in layout.splits.values() for e in es)}
    if layout.config_path is not None:
        own_files.add(layout.config_path)
    folders = {label.parent for label in labels}
    found = {txt for folder in folders if folder.is_dir() for txt in folder.glob("*.txt")}
    for entry in entries:
        if entry.path.is_dir() and label_dir(entry.path).is_dir():
            found.update(label_dir(entry.path).rglob("*.txt"))
    for txt in sorted(found - expected - own_files):
        if txt.name != CLASSES_FILE:
            suffixes = ",".join(s.lstrip(".") for s in sorted(IMAGE_SUFFIXES))
            raise DatasetFormatError(
                f"{txt}: label file without an image in the split (looked for {image_stem(txt)}.{{{suffixes}}})"
            )


def image_stem(label: Path) -> Path:
    """Where the image of ``label`` would be, without its suffix (``labels`` -> ``images``)."""
    parts = list(label.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "labels":
            parts[k] = "images"
            break
    return Path(*parts).with_suffix("")


def _decimals(token: str) -> int:
    """Digits after the point as written ("0.12345" -> 5, "1.5e-03" -> 4, "1" -> 0)."""
    mantissa, _, exponent = token.lower().partition("e")
    digits = len(mantissa.partition(".")[2])
    try:
        return max(digits - int(exponent or 0), 0)
    except ValueError:
        return digits


def _parse_lines(label: Path, num_classes: int) -> tuple[list[int], list[list[float]], list[int], list[str]]:
    classes, values, decimals, sources = [], [], [], []
    for line_no, line in enumerate(read_text(label).splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        at = f"{label}:{line_no}"
        if len(tokens) != 5:
            raise DatasetFormatError(
                f"{at}: expected 5 fields 'class cx cy w h', got {len(tokens)} "
                f"({line.strip()!r}; segment labels are not supported)"
            )
        try:
            class_id = int(tokens[0])
        except ValueError:
            raise DatasetFormatError(f"{at}: class id must be an integer, got {tokens[0]!r}") from None
        if not 0 <= class_id < num_classes:
            raise DatasetFormatError(
                f"{at}: class id {class_id} out of range; the dataset has {num_classes} "
                f"classes (ids 0..{num_classes - 1})"
            )
        try:
            values.append([float(t) for t in tokens[1:]])
        except ValueError:
            raise DatasetFormatError(f"{at}: cx cy w h must be numbers, got {tokens[1:]}") from None
        classes.append(class_id)
        decimals.append(max(_decimals(t) for t in tokens[1:]))
        sources.append(at)
    return classes, values, decimals, sources


def rounding_tolerance(decimals: np.ndarray) -> np.ndarray:
    """Normalized distance outside the image that the rounding of ``decimals`` [N] explains."""
    tolerance = np.where(decimals > 0, 0.75 * 10.0 ** -decimals.astype(np.float64), 0.0)
    return np.maximum(tolerance, ROUNDING)


def _clamp_rounding(
    xyxy: np.ndarray, width: int, height: int, decimals: np.ndarray, where: list[str], checker: BoxChecker
) -> np.ndarray:
    """Put corners that lie within the line's rounding outside the image on its border (counted)."""
    size = np.array([width, height, width, height], dtype=np.float64)
    tolerance = rounding_tolerance(decimals)[:, None] * size  # [N, 4] pixels
    low = (xyxy < 0) & (xyxy >= -tolerance)
    high = (xyxy > size) & (xyxy <= size + tolerance)
    rounded = (low | high).any(axis=1)
    if rounded.any():
        idx = np.flatnonzero(rounded)
        checker.report.add(
            "repair: box corner outside the image by less than the rounding of its decimals put on the border",
            [where[i] for i in idx[:3]],
            count=len(idx),
        )
    return np.where(low, 0.0, np.where(high, size, xyxy))


def _record(
    image: Path, label: Path, width: int, height: int, label_map: LabelMap, checker: BoxChecker
) -> ImageRecord:
    parsed = _parse_lines(label, len(label_map)) if label.is_file() else ([], [], [], [])
    classes, values, decimals, sources = parsed
    where = [f"{s} (image {image.name} {width}x{height})" for s in sources]
    norm = np.asarray(values, dtype=np.float64).reshape(-1, 4)  # [N, 4] normalized cx cy w h
    cx, cy, w, h = norm.T
    xyxy = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    xyxy = _clamp_rounding(xyxy, width, height, np.asarray(decimals, dtype=np.int64), where, checker)
    boxes, keep = checker.check(
        xyxy, width, height, where,
        describe=lambda i: "normalized (cx, cy, w, h) = (" + ", ".join(f"{v:g}" for v in norm[i]) + ")",
    )
    return ImageRecord(
        image_path=image,
        width=width,
        height=height,
        boxes=boxes,
        labels=np.asarray(classes, dtype=np.int64)[keep],
        box_sources=tuple(s for s, k in zip(sources, keep, strict=True) if k),
        source=str(label),
        image_id=image.stem,
    )


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def write(dataset: DetectionDataset, out_dir: Path, split: str, images: str) -> DatasetReport:
    """Write ``images/<split>/``, ``labels/<split>/`` and the split's entry in ``data.yaml``."""
    config_path = out_dir / CONFIG_FILE
    config: dict = {}
    existing = None
    if config_path.is_file():
        config = yaml_config(config_path)
        existing = names_of(config_path, config["names"]) if "names" in config else None
    label_map = directory_label_map(existing, dataset.label_map, config_path)
    class_ids = dataset.label_map.mapping_to(label_map)  # [K_dataset] -> id in data.yaml
    if split in config or (out_dir / "labels" / split).exists():
        raise DatasetFormatError(
            f"{config_path}: split {split!r} was written to this directory before; "
            "write it to an empty directory or choose another split name"
        )
    file_names = unique_file_names(dataset, split)
    check_unique([Path(n).stem for n in file_names], file_names, "image file stem (YOLO label file name)")
    losses = LossCounter("YOLO", attributes=(), extras_prefix="yolo_")
    label_dir = out_dir / "labels" / split
    label_dir.mkdir(parents=True, exist_ok=True)
    for record, file_name in zip(dataset.records, file_names, strict=True):
        losses.visit(record)
        lines = _label_lines(record, class_ids)
        (label_dir / f"{Path(file_name).stem}.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        place_image(record.image_path, out_dir / "images" / split / file_name, images)
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    config.pop("names", None)
    config[split] = f"images/{split}"
    config["names"] = dict(enumerate(label_map.names))
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return losses.build()


def _label_lines(record: ImageRecord, class_ids: np.ndarray) -> list[str]:
    """'class cx cy w h' lines; each (center, size) pair gets the fewest decimals that the reader's
    arithmetic turns back into exactly the stored float32 corners."""
    boxes = record.boxes.astype(np.float64)  # [N, 4] xyxy pixels
    columns = []
    for lo, hi, size in ((0, 2, record.width), (1, 3, record.height)):
        exact = np.stack([(boxes[:, lo] + boxes[:, hi]) / 2 / size, (boxes[:, hi] - boxes[:, lo]) / size], 1)

        def reproduces(c, lo=lo, hi=hi, size=size):
            first = ((c[:, 0] - c[:, 1] / 2) * size).astype(np.float32) == record.boxes[:, lo]
            second = ((c[:, 0] + c[:, 1] / 2) * size).astype(np.float32) == record.boxes[:, hi]
            return first & second

        columns.append(shortest_decimals(exact, reproduces, max_decimals=17) if record.num_boxes else exact)
    (cx, w), (cy, h) = (c.T for c in columns)
    return [
        f"{int(k)} {number(a)} {number(b)} {number(c)} {number(d)}"
        for k, a, b, c, d in zip(class_ids[record.labels].tolist(), cx, cy, w, h, strict=True)
    ]
