"""COCO detection JSON: reading and writing.

Layout (what :func:`write` produces and :func:`read` expects for a directory)::

    <root>/annotations/<split>.json     one file per split ("train", "val", ...)
    <root>/images/<split>/<file_name>   the images of that split

Also read:

* the official layout, ``annotations/instances_<split>.json`` with images in ``<root>/<split>/``
  (``split="val2017"`` finds ``instances_val2017.json``; when ``instances_*.json`` files exist the
  other JSON files of ``annotations/`` - captions, keypoints - are not splits);
* a path to one ``.json`` file; image ``file_name`` s are then looked up, in order, in
  ``images/<split>/``, ``images/``, ``<split>/`` next to the ``annotations`` directory, the JSON's own
  directory and the dataset root; the first directory holding the first image wins.

Mapping to records: categories may have arbitrary, non-contiguous ids; label ids are their
positions in the ``categories`` list (the label map keeps the category order). ``bbox`` [x, y, w, h]
becomes xyxy ``[x, y, x + w, y + h]``. ``iscrowd`` is a box attribute. The annotation ``id``,
``area``, ``segmentation`` and any other annotation keys are kept per box in ``extras`` (``coco_ann_id``
int64 [N] and ``coco_annotation``: the annotation object as read)
and written back unchanged. Not carried (named in the report's notes): top-level ``info`` /
``licenses``, image keys other than id/file_name/width/height, category keys other than id/name.
A written file numbers categories 1..K in label order; integer image ids are kept, other ids
(e.g. VOC file stems) become 1..N in record order, with the file name keeping the stem.

The reader is vectorized: one ``json.loads``, then numpy over all annotations (grouping by image with
a stable sort), so it is at least as fast as ``pycocotools.coco.COCO`` on the same file
(``bench/coco_read.py``).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detr.data.dataset import DetectionDataset, ReportBuilder, concatenate
from detr.data.formats.coco_columns import Places, annotation_columns, int_array, is_int, lookup
from detr.data.formats.coco_write import write
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.validate import BoxChecker, check_image_size, check_unique
from detr.errors import DatasetFormatError

IMAGE_KEYS = ("id", "file_name", "width", "height")
# COCO has no ignore regions; one shared read-only empty array instead of one per image.
NO_REGIONS = np.zeros((0, 4), np.float32)
NO_REGIONS.flags.writeable = False


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------


def split_files(root: Path) -> dict[str, Path]:
    """split name -> annotation file of a dataset directory (or of a single JSON file)."""
    if root.is_file():
        return {root.stem: root}
    folder = root / "annotations"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    instances = [f for f in files if f.stem.startswith("instances_")]
    if instances:
        return {f.stem.removeprefix("instances_"): f for f in instances}
    return {f.stem: f for f in files}


def list_splits(root: Path) -> list[str]:
    return list(split_files(root))


__all__ = ["list_splits", "read", "split_files", "write"]


def read(
    root: Path, split: str | None, *, checker: BoxChecker, report: ReportBuilder, check_images: bool
) -> DetectionDataset:
    files = split_files(root)
    if not files:
        raise DatasetFormatError(f"{root}: no COCO annotation files (expected annotations/<split>.json)")
    if split is not None:
        if split not in files:
            raise DatasetFormatError(
                f"{root}: no COCO split {split!r}; available splits: {sorted(files)}"
            )
        files = {split: files[split]}
    parts = [
        _read_file(path, name, checker=checker, report=report, check_images=check_images)
        for name, path in files.items()
    ]
    if len(parts) == 1:
        return parts[0]
    return concatenate(parts, list(files), name=root.name)


# ---------------------------------------------------------------------------------------------
# reading one file
# ---------------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise DatasetFormatError(f"{path}: cannot read annotation file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetFormatError(
                f"{path}: expected a list {key!r} at the top level, got "
                f"{type(data.get(key)).__name__ if key in data else 'nothing'}"
            )
    return data


def _label_map(path: Path, categories: list) -> tuple[LabelMap, np.ndarray]:
    """The label map in category order, and the category ids in that order (int64 [K])."""
    names, ids = [], []
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DatasetFormatError(
                f"{path}: categories[{i}] must be an object with an integer 'id' and a string 'name', got {cat!r}"
            )
        names.append(cat["name"])
        ids.append(cat["id"])
    check_unique(ids, [f"{path}: categories[{i}]" for i in range(len(ids))], "category id")
    check_unique(names, [f"{path}: categories[{i}]" for i in range(len(ids))], "category name")
    return LabelMap(tuple(names)), np.asarray(ids, dtype=np.int64)


def _images(path: Path, images: list) -> tuple[list, list[str], np.ndarray, np.ndarray]:
    """Columns of the ``images`` entries: ids, file names, widths and heights (float64 [M])."""
    try:
        ids = list(map(itemgetter("id"), images))
        names = list(map(itemgetter("file_name"), images))
        widths = np.asarray(list(map(itemgetter("width"), images)))
        heights = np.asarray(list(map(itemgetter("height"), images)))
        ok = (
            (not images or (widths.dtype.kind == heights.dtype.kind == "i" and widths.min() > 0 and heights.min() > 0))
            and all(type(n) is str for n in names)
            and (all(type(i) is int for i in ids) or all(type(i) is str for i in ids))
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        for i, image in enumerate(images):
            good = (
                isinstance(image, dict)
                and (is_int(image.get("id")) or isinstance(image.get("id"), str))
                and isinstance(image.get("file_name"), str)
                and is_int(image.get("width")) and image["width"] > 0
                and is_int(image.get("height")) and image["height"] > 0
            )
            if not good:
                raise DatasetFormatError(
                    f"{path}: images[{i}] must have an integer 'id', a string 'file_name' and positive "
                    f"integer 'width' and 'height', got {image!r}"
                )
        raise DatasetFormatError(f"{path}: image ids must be all integers or all strings")
    where = Places(f"{path}: images")
    check_unique(ids, where, "image id")
    check_unique(names, where, "image file_name")
    return ids, names, widths.astype(np.float64), heights.astype(np.float64)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a large, long-lived, acyclic object graph.

    ``json.loads`` of a COCO file and the records built from it create ~10^6 containers. With the
    collector running, every full collection during the build traverses all of them again; after
    a plain pause, the first young-generation collections would still scan them all. So on exit
    everything built is moved straight to the oldest generation (``gc.freeze()`` then
    ``gc.unfreeze()``, which moves without scanning), where it waits for the next full collection
    like any long-lived data. That step is skipped when the application has frozen objects itself
    (``gc.get_freeze_count()``), so its frozen set is never touched. Nothing built here forms a
    cycle; reference counting frees it all the same.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        if enabled:
            gc.enable()


def _read_file(
    path: Path, split: str, *, checker: BoxChecker, report: ReportBuilder, check_images: bool
) -> DetectionDataset:
    with _gc_paused():
        data = _load_json(path)
        label_map, category_ids = _label_map(path, data["categories"])
        image_ids, file_names, widths, heights = _images(path, data["images"])
        _note_dropped_keys(path, data, report)
        records = _records(path, split, data["annotations"], category_ids, image_ids, file_names, widths, heights,
                           checker, check_images)
        del data
    if check_images:
        for record in tqdm(records, desc=f"checking images of {path.name}", unit="img", disable=None, leave=False):
            check_image_size(record.image_path, record.width, record.height, referenced_by=record.source)
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    return DetectionDataset(tuple(records), label_map, f"{root.name}:{split}", "coco")


def _records(
    path: Path, split: str, anns: list, category_ids: np.ndarray, image_ids: list, file_names: list[str],
    widths: np.ndarray, heights: np.ndarray, checker: BoxChecker, check_images: bool,
) -> list[ImageRecord]:
    ann_ids, ann_image_ids, cat_ids, bboxes, iscrowd = annotation_columns(path, anns)
    n = len(anns)

    # Which image and which label each annotation belongs to.
    image_index = _image_index(path, anns, ann_image_ids, image_ids)
    labels = lookup(cat_ids, category_ids) if n else np.zeros(0, np.int64)
    if (labels < 0).any():
        i = int(np.flatnonzero(labels < 0)[0])
        raise DatasetFormatError(
            f"{path}: annotations[{i}] (id={int(ann_ids[i])}): category_id {int(cat_ids[i])} is not "
            f"in categories (ids {category_ids.tolist()})"
        )

    name = str(path)

    def where(i: int) -> str:
        return f"{name}: annotations[{i}] (id={int(ann_ids[i])})"

    xyxy = bboxes.copy()
    xyxy[:, 2:] += xyxy[:, :2]  # [N, 4] x, y, w, h -> x1, y1, x2, y2
    boxes, keep = checker.check(xyxy, widths[image_index], heights[image_index], where)
    kept = np.flatnonzero(keep)

    # Group the kept annotations by image: a stable sort keeps file order within an image.
    perm = np.argsort(image_index[kept], kind="stable")
    idx = kept[perm]  # annotation indices, grouped by image
    boxes = boxes[perm]
    counts = np.bincount(image_index[idx], minlength=len(image_ids))
    ends = np.cumsum(counts)
    bounds = list(zip((ends - counts).tolist(), ends.tolist(), strict=True))
    labels, iscrowd, ann_ids = labels[idx], iscrowd[idx].astype(bool), ann_ids[idx]
    # The annotation objects themselves carry area, segmentation and any other keys for writing back.
    objects = _object_column(anns)[idx]
    sources = [f"{name}: annotations[{i}] (id={a})" for i, a in zip(idx.tolist(), ann_ids.tolist(), strict=True)]

    image_dir = _image_dir(path, split, file_names, check_images)
    records = []
    for k, ((s, e), image_id, file_name, width, height) in enumerate(
        zip(bounds, image_ids, file_names, widths.astype(np.int64).tolist(), heights.astype(np.int64).tolist(),
            strict=True)
    ):
        records.append(
            ImageRecord(
                image_path=image_dir / file_name,
                width=width,
                height=height,
                boxes=boxes[s:e],
                labels=labels[s:e],
                box_sources=tuple(sources[s:e]),
                source=f"{name}: images[{k}] (id={image_id})",
                image_id=image_id,
                attributes={"iscrowd": iscrowd[s:e]},
                ignore_regions=NO_REGIONS,
                extras={"coco_ann_id": ann_ids[s:e], "coco_annotation": objects[s:e]},
            )
        )
    return records


def _object_column(values: list) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _image_index(path: Path, anns: list, ann_image_ids: list, image_ids: list) -> np.ndarray:
    """Position in ``images`` of each annotation's image_id; an unknown image_id is an error."""
    keys = int_array(ann_image_ids) if image_ids and type(image_ids[0]) is int else None
    if keys is not None:
        index = lookup(keys, np.asarray(image_ids, dtype=np.int64))
    else:
        positions = {v: i for i, v in enumerate(image_ids)}
        index = np.array([positions.get(v, -1) if isinstance(v, (int, str)) else -1 for v in ann_image_ids],
                         dtype=np.int64)
    if (index < 0).any():
        i = int(np.flatnonzero(index < 0)[0])
        raise DatasetFormatError(
            f"{path}: annotations[{i}] (id={anns[i].get('id')}): image_id {ann_image_ids[i]!r} is not "
            "the id of any entry in images"
        )
    return index


def _image_dir(path: Path, split: str, file_names: Sequence[str], check_images: bool) -> Path:
    """The directory the ``file_name`` s are relative to (see the module docstring for the order)."""
    in_annotations = path.parent.name == "annotations"
    root = path.parent.parent if in_annotations else path.parent
    short = split.removeprefix("instances_")
    candidates = list(dict.fromkeys([
        root / "images" / split, root / "images" / short, root / "images", root / short, path.parent, root,
    ]))
    existing = [d for d in candidates if d.is_dir()]
    if not file_names:
        return existing[0] if existing else candidates[0]
    for folder in existing:
        if (folder / file_names[0]).exists():
            return folder
    if check_images:
        raise DatasetFormatError(
            f"{path}: images[0] file_name {file_names[0]!r} not found in any of "
            f"{[str(d) for d in candidates]}"
        )
    return existing[0] if existing else candidates[0]


def _note_dropped_keys(path: Path, data: dict, report: ReportBuilder) -> None:
    top = sorted(set(data) - {"images", "annotations", "categories"})
    if top:
        report.note(f"{path.name}: top-level keys not carried: {', '.join(top)}")
    image_keys = set().union(*(im.keys() for im in data["images"])) - set(IMAGE_KEYS) if data["images"] else set()
    if image_keys:
        report.note(f"{path.name}: image keys not carried: {', '.join(sorted(image_keys))}")
    cat_keys = set().union(*(c.keys() for c in data["categories"])) - {"id", "name"} if data["categories"] else set()
    if cat_keys:
        report.note(f"{path.name}: category keys not carried: {', '.join(sorted(cat_keys))}")
