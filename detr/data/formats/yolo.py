"""YOLO (Ultralytics/Darknet) text labels: reading and writing.

Layout::

    <root>/data.yaml                 names (list, or dict {id: name}), and one entry per split:
                                     train: images/train    val: images/val
    <root>/images/<split>/*.jpg      images
    <root>/labels/<split>/*.txt      one file per image: "class cx cy w h" per line, normalized 0..1

Without ``data.yaml``, class names come from ``<root>/classes.txt`` (one per line) and the splits
are the subdirectories of ``images/``. A split entry of ``data.yaml`` is a directory, a ``.txt``
list of image paths, or a list of those, relative to the ``path`` key (itself relative to the
YAML's directory) or to the YAML's directory. The label file of an image is found as Ultralytics
does: the last ``images`` directory of its path replaced by ``labels`` and the suffix by ``.txt``.

Corners at most 1e-6 of the image size outside it (decimal rounding of a box touching the border)
are put on the border and counted in the report. An image without a label file has no objects
(YOLO's background images; counted in the notes). A label file without an image is an error
(missing image), and so is a split whose ``labels``
directory is missing when that split is asked for by name (with ``split=None`` such a split, e.g.
an unlabelled ``test``, is skipped and named in the notes). Image sizes always come from the
image headers, since the labels are normalized: ``check_images=False`` still opens each header.
Image ids are the file stems. The writer writes ``data.yaml`` with ``names`` as a dict and one empty
label file for an image without objects. Segment (polygon) labels are not supported: a line must
have exactly 5 fields.
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
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.validate import BoxChecker, check_unique, read_image_size, read_text
from detr.errors import DatasetFormatError

CONFIG_FILE = "data.yaml"
CLASSES_FILE = "classes.txt"
NON_SPLIT_KEYS = frozenset({"path", "names", "nc", "download", "kpt_shape", "flip_idx", "channels", "yaml_file"})
# Normalized distance outside the image that is decimal rounding of a border-touching box.
ROUNDING = 1e-6
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


# ---------------------------------------------------------------------------------------------
# configuration: class names and splits
# ---------------------------------------------------------------------------------------------


def _config(root: Path) -> tuple[Path, Path | None, dict]:
    """(dataset root, data.yaml path or None, its content)."""
    config_path = root if root.is_file() else root / CONFIG_FILE
    root = config_path.parent if root.is_file() else root
    if not config_path.is_file():
        return root, None, {}
    try:
        config = yaml.safe_load(read_text(config_path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise DatasetFormatError(f"{config_path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(config, dict):
        raise DatasetFormatError(f"{config_path}: expected a mapping with 'names' and split entries")
    return root, config_path, config


def _names_of(config_path: Path, names) -> LabelMap:
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DatasetFormatError(
                f"{config_path}: 'names' keys must be the class ids 0..{len(keys) - 1}, got {keys}"
            )
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DatasetFormatError(f"{config_path}: 'names' must be a list of class names or a dict id -> name")
    return LabelMap(tuple(names))


def _label_map(root: Path, config_path: Path | None, config: dict) -> LabelMap:
    if config_path is not None:
        if "names" not in config:
            raise DatasetFormatError(f"{config_path}: missing 'names' (the class names)")
        label_map = _names_of(config_path, config["names"])
        if "nc" in config and config["nc"] != len(label_map):
            raise DatasetFormatError(
                f"{config_path}: nc = {config['nc']!r} but 'names' lists {len(label_map)} classes"
            )
        return label_map
    classes = root / CLASSES_FILE
    if not classes.is_file():
        raise DatasetFormatError(f"{root}: no {CONFIG_FILE} or {CLASSES_FILE} with the class names")
    names = [line.strip() for line in read_text(classes).splitlines() if line.strip()]
    return LabelMap(tuple(names))


def _split_entries(root: Path, config_path: Path | None, config: dict) -> dict[str, list[Path]]:
    """split -> its image directories / list files."""
    if config_path is None:
        folder = root / "images"
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        return {p.name: [p] for p in subdirs}
    base = config_path.parent
    if isinstance(config.get("path"), str):
        base = base / config["path"]
    entries: dict[str, list[Path]] = {}
    for key, value in config.items():
        if key in NON_SPLIT_KEYS or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            continue
        entries[str(key)] = [base / v for v in values]
    return entries


def list_splits(root: Path) -> list[str]:
    """Splits that have labels (an unlabelled ``test`` entry is not a dataset split here)."""
    entries = _split_entries(*_config(root))
    return [name for name, dirs in entries.items() if all(_has_labels(d) for d in dirs)]


def _has_labels(entry: Path) -> bool:
    if not entry.is_dir():
        return entry.is_file()
    try:
        return label_path(entry / "x").parent.is_dir()
    except DatasetFormatError:
        return False


def label_path(image: Path) -> Path:
    """``.../images/x/a.jpg`` -> ``.../labels/x/a.txt`` (the last ``images`` part is replaced)."""
    parts = list(image.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts).with_suffix(".txt")
    raise DatasetFormatError(f"{image}: a YOLO image path must contain an 'images' directory")


def _images_of(entry: Path, where: str) -> list[Path]:
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if entry.is_file() and entry.suffix == ".txt":
        lines = [line.strip() for line in read_text(entry).splitlines() if line.strip()]
        return [entry.parent / line for line in lines]
    raise DatasetFormatError(f"{where}: {entry} is neither an image directory nor a .txt list of images")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def read(
    root: Path, split: str | None, *, checker: BoxChecker, report: ReportBuilder, check_images: bool
) -> DetectionDataset:
    root, config_path, config = _config(root)
    label_map = _label_map(root, config_path, config)
    entries = _split_entries(root, config_path, config)
    where = str(config_path or root / "images")
    if not entries:
        raise DatasetFormatError(f"{where}: no splits (expected 'train'/'val' entries or images/<split>/ dirs)")
    if split is not None:
        if split not in entries:
            raise DatasetFormatError(f"{where}: no YOLO split {split!r}; available splits: {sorted(entries)}")
        entries = {split: entries[split]}
    parts, names = [], []
    for name, dirs in entries.items():
        label_dirs = [label_path(d / "x").parent for d in dirs if d.is_dir()]
        missing = [d for d in label_dirs if not d.is_dir()]
        if missing:
            if split is not None:
                raise DatasetFormatError(f"{where}: split {name!r} has no label directory {missing[0]}")
            report.note(f"split {name!r} skipped: no label directory {missing[0]}")
            continue
        parts.append(_read_split(root, name, dirs, label_dirs, label_map, checker, report, where))
        names.append(name)
    if not parts:
        raise DatasetFormatError(f"{where}: no split has labels")
    if len(parts) == 1:
        return parts[0]
    return concatenate(parts, names, name=root.name)


def _read_split(
    root: Path, split: str, entries: list[Path], label_dirs: list[Path], label_map: LabelMap,
    checker: BoxChecker, report: ReportBuilder, where: str,
) -> DetectionDataset:
    images = [image for entry in entries for image in _images_of(entry, f"{where}: {split}")]
    labels = [label_path(image) for image in images]
    check_unique([str(p) for p in labels], [str(p) for p in images], "label file (two images share a stem)")
    check_unique([p.stem for p in images], [str(p) for p in images], "image id (file stem)")
    expected = set(labels)
    for label_dir in label_dirs:
        for txt in sorted(label_dir.rglob("*.txt")):
            if txt not in expected and txt.name != CLASSES_FILE:
                raise DatasetFormatError(f"{txt}: label file without an image (no {txt.stem}.* in the split's images)")
    records, unlabelled = [], 0
    pairs = list(zip(images, labels, strict=True))
    for image, label in tqdm(pairs, desc=f"reading {split}", unit="img", disable=None, leave=False):
        width, height = read_image_size(image, referenced_by=f"{where}: split {split!r}")
        if not label.is_file():
            unlabelled += 1
        records.append(_record(image, label, width, height, label_map, checker))
    if unlabelled:
        report.note(f"split {split!r}: {unlabelled} images have no label file (read as images without objects)")
    return DetectionDataset(tuple(records), label_map, f"{root.name}:{split}", "yolo")


def _parse_lines(label: Path, num_classes: int) -> tuple[list[int], list[list[float]], list[str]]:
    classes, values, sources = [], [], []
    for line_no, line in enumerate(read_text(label).splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        at = f"{label.name}:{line_no}"
        if len(tokens) != 5:
            raise DatasetFormatError(
                f"{label}:{line_no}: expected 5 fields 'class cx cy w h', got {len(tokens)} "
                f"({line.strip()!r}; segment labels are not supported)"
            )
        try:
            class_id = int(tokens[0])
        except ValueError:
            raise DatasetFormatError(f"{label}:{line_no}: class id must be an integer, got {tokens[0]!r}") from None
        if not 0 <= class_id < num_classes:
            raise DatasetFormatError(
                f"{label}:{line_no}: class id {class_id} out of range; the dataset has {num_classes} "
                f"classes (ids 0..{num_classes - 1})"
            )
        try:
            values.append([float(t) for t in tokens[1:]])
        except ValueError:
            raise DatasetFormatError(f"{label}:{line_no}: cx cy w h must be numbers, got {tokens[1:]}") from None
        classes.append(class_id)
        sources.append(at)
    return classes, values, sources


def _clamp_rounding(
    xyxy: np.ndarray, width: int, height: int, where: list[str], checker: BoxChecker
) -> np.ndarray:
    """Put corners that lie at most ``ROUNDING`` (normalized) outside the image on its border.

    Label files hold rounded decimals (Ultralytics writes 6), so a box touching the border can come
    back a few 1e-4 px outside it. That is rounding, not an annotation error; it is still counted.
    """
    size = np.array([width, height, width, height], dtype=np.float64)
    low = (xyxy < 0) & (xyxy >= -ROUNDING * size)
    high = (xyxy > size) & (xyxy <= size * (1 + ROUNDING))
    rounded = (low | high).any(axis=1)
    if rounded.any():
        idx = np.flatnonzero(rounded)
        checker.report.add(
            f"repair: box corner <= {ROUNDING:g} x image size outside put on the border (decimal rounding)",
            [where[i] for i in idx[:3]],
            count=len(idx),
        )
    return np.where(low, 0.0, np.where(high, size, xyxy))


def _record(
    image: Path, label: Path, width: int, height: int, label_map: LabelMap, checker: BoxChecker
) -> ImageRecord:
    classes, values, sources = _parse_lines(label, len(label_map)) if label.is_file() else ([], [], [])
    where = [f"{s} ({image.name} {width}x{height})" for s in sources]
    norm = np.asarray(values, dtype=np.float64).reshape(-1, 4)  # [N, 4] normalized cx cy w h
    cx, cy, w, h = norm.T
    xyxy = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    xyxy = _clamp_rounding(xyxy, width, height, where, checker)
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
        _, _, config = _config(out_dir)
        existing = _names_of(config_path, config["names"]) if "names" in config else None
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
