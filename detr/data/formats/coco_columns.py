"""A COCO file's annotation list as numpy columns: one pass per field, checked in C.

Columns of JSON values go through ``array.array``: it converts a list in C about twice as fast as
``np.asarray`` and rejects what is not a number of the kind (a string, a float id) by itself. When any
entry is malformed, a slow pass finds the first one and names it (file, index and annotation id).
"""

from __future__ import annotations

from array import array
from itertools import chain
from operator import itemgetter
from pathlib import Path

import numpy as np

from detr.data.validate import check_unique
from detr.errors import DatasetFormatError


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Places:
    """``where[i]`` -> "<prefix>[i]" without building all the strings up front."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __getitem__(self, i: int) -> str:
        return f"{self.prefix}[{i}]"


def lookup(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of each key in ``table`` (int64 [N]), -1 where absent."""
    order = np.argsort(table, kind="stable")
    sorted_table = table[order]
    pos = np.searchsorted(sorted_table, keys)
    pos = np.minimum(pos, max(len(table) - 1, 0))
    found = (sorted_table[pos] == keys) if len(table) else np.zeros(len(keys), bool)
    return np.where(found, order[pos] if len(table) else -1, -1)


def bad_annotation(path: Path, anns: list, check) -> DatasetFormatError:
    """Find the first annotation ``check`` rejects (slow path, only when the fast one failed)."""
    for i, ann in enumerate(anns):
        problem = check(ann)
        if problem:
            ident = f" (id={ann.get('id')})" if isinstance(ann, dict) else ""
            return DatasetFormatError(f"{path}: annotations[{i}]{ident}: {problem}")
    return DatasetFormatError(f"{path}: malformed annotations")


def annotation_problem(ann) -> str | None:
    if not isinstance(ann, dict):
        return f"expected an object, got {ann!r}"
    for key in ("id", "image_id", "category_id", "bbox"):
        if key not in ann:
            return f"missing {key!r}"
    if not is_int(ann["id"]):
        return f"'id' must be an integer, got {ann['id']!r}"
    if not is_int(ann["category_id"]):
        return f"'category_id' must be an integer, got {ann['category_id']!r}"
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        return f"'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}"
    if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd", 0), float):
        return f"'iscrowd' must be 0 or 1, got {ann.get('iscrowd')!r}"
    return None


def int_array(values: list) -> np.ndarray | None:
    """int64 [N] if every value is a JSON integer, else None."""
    try:
        return np.frombuffer(array("q", values), np.int64)
    except (TypeError, OverflowError):
        return None


def bbox_array(values: list) -> np.ndarray | None:
    """float64 [N, 4] if every value is a list of 4 JSON numbers, else None."""
    if set(map(len, values)) != {4}:
        return None
    try:
        return np.frombuffer(array("d", chain.from_iterable(values)), np.float64).reshape(-1, 4)
    except TypeError:
        return None


def annotation_columns(path: Path, anns: list) -> tuple[np.ndarray, list, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, image_ids, category_ids, bboxes [N, 4], iscrowd) of all annotations, one pass per field;
    any malformed entry sends us to the slow path that finds and names it."""
    n = len(anns)
    if not n:
        empty = np.zeros(0, np.int64)
        return empty, [], empty, np.zeros((0, 4)), empty
    try:
        ann_ids = int_array(list(map(itemgetter("id"), anns)))
        ann_image_ids = list(map(itemgetter("image_id"), anns))
        cat_ids = int_array(list(map(itemgetter("category_id"), anns)))
        bboxes = bbox_array(list(map(itemgetter("bbox"), anns)))
        try:  # iscrowd is optional; most files have it on every annotation
            iscrowd = int_array(list(map(itemgetter("iscrowd"), anns)))
        except KeyError:
            iscrowd = int_array([a.get("iscrowd", 0) for a in anns])
    except (KeyError, TypeError, AttributeError):
        raise bad_annotation(path, anns, annotation_problem) from None
    columns = (ann_ids, cat_ids, bboxes, iscrowd)
    if any(c is None for c in columns) or iscrowd.min() < 0 or iscrowd.max() > 1:
        raise bad_annotation(path, anns, annotation_problem)
    check_unique(ann_ids.tolist(), Places(f"{path}: annotations"), "annotation id")
    return ann_ids, ann_image_ids, cat_ids, bboxes, iscrowd
