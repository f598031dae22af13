"""What every format writer shares: placing image files, exact-but-short numbers, and counting
what the target format cannot hold.

Numbers: records hold float32 pixels, files hold decimal text. A writer picks, per value, the
fewest decimals whose text the matching reader turns back into the *same* float32 (checked with the
reader's own arithmetic), so integer boxes are written as integers and a same-format round trip is
exact.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from detr.data.dataset import DatasetReport, DetectionDataset, ReportBuilder
from detr.data.labelmap import LabelMap
from detr.data.records import ATTRIBUTE_DTYPES
from detr.errors import DatasetFormatError, InvalidInputError

IMAGE_MODES = ("copy", "link")
MAX_DECIMALS = 12


def check_image_mode(images: str) -> None:
    if images not in IMAGE_MODES:
        raise InvalidInputError(f"images={images!r}: expected one of {list(IMAGE_MODES)}")


def check_split_name(split: str) -> None:
    if not split or any(c in split for c in "/\\") or split in (".", ".."):
        raise InvalidInputError(f"split {split!r}: expected a plain name such as 'train' or 'val'")


def refuse_existing(path: Path, split: str) -> None:
    """Writers add splits to a directory but never overwrite one (stale files would mix in)."""
    if path.exists():
        raise DatasetFormatError(
            f"{path} already exists: split {split!r} was written to this directory before; "
            "write it to an empty directory or choose another split name"
        )


def place_image(src: Path, dst: Path, mode: str) -> None:
    """Copy or link ``src`` to ``dst``; a hard link falls back to a symlink across file systems."""
    if not src.is_file():
        raise DatasetFormatError(f"image file {src} not found; cannot write it to {dst}")
    if dst.exists() or dst.is_symlink():
        raise DatasetFormatError(f"{dst} already exists; two images would share one file name")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        shutil.copyfile(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # EXDEV (other file system) or links unsupported: a symlink still works
        os.symlink(src.resolve(), dst)


def directory_label_map(existing: LabelMap | None, dataset: LabelMap, where: Path) -> LabelMap:
    """The class list a split is written with: a directory has one (``data.yaml`` names,
    ``labels.txt``) shared by its splits; a later split may use a subset of it, never a new class
    (the files of the splits already there would not match any more)."""
    if existing is None or existing.names == dataset.names:
        return dataset
    new = [n for n in dataset.names if n not in existing]
    if new:
        raise DatasetFormatError(
            f"{where} lists classes {list(existing.names)}; the split being written also has {new}. "
            "Write all splits with one label map (e.g. through `detr data convert`) or use a new directory"
        )
    return existing


def unique_file_names(dataset: DetectionDataset, split: str) -> list[str]:
    """The image file names of a split; two records with one name cannot share a directory."""
    names = [r.image_path.name for r in dataset.records]
    seen: dict[str, str] = {}
    for name, record in zip(names, dataset.records, strict=True):
        if name in seen:
            raise DatasetFormatError(
                f"split {split!r}: images {seen[name]} and {record.image_path} have the same file "
                f"name {name!r}; rename one before writing"
            )
        seen[name] = str(record.image_path)
    return names


def shortest_decimals(
    exact: np.ndarray, reproduces: Callable[[np.ndarray], np.ndarray], max_decimals: int = MAX_DECIMALS
) -> np.ndarray:
    """Round ``exact`` (float64 [N] or [N, C]) to the fewest decimals that still ``reproduces`` the
    stored value. ``reproduces(candidate)`` returns bool per element (same shape) or per row ([N],
    for values that must round together, like YOLO's center and size); those that never do keep
    ``exact``."""
    exact = np.asarray(exact, dtype=np.float64)
    out = exact.copy()
    todo = None
    for decimals in range(max_decimals + 1):
        candidate = np.round(exact, decimals)
        ok = np.asarray(reproduces(candidate), dtype=bool)
        todo = np.ones(ok.shape, dtype=bool) if todo is None else todo
        ok &= todo
        out[ok] = candidate[ok]
        todo &= ~ok
        if not todo.any():
            break
    return out


def float32_text(values: np.ndarray) -> np.ndarray:
    """float64 values (any shape) that print short and convert back to the same float32 ``values``
    (for formats whose numbers are read directly, without arithmetic)."""
    values32 = np.asarray(values, dtype=np.float32)
    flat = values32.ravel()
    short = shortest_decimals(flat.astype(np.float64), lambda c: c.astype(np.float32) == flat)
    return short.reshape(values32.shape)


def number(value: float) -> str:
    """Decimal text of a value chosen by :func:`shortest_decimals`: integers without a point."""
    value = float(value)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class LossCounter:
    """Counts what a target format cannot express (attributes, ignore regions, other formats'
    per-box fields) so that a conversion reports it instead of dropping it silently."""

    def __init__(
        self, format: str, *, attributes: Iterable[str], extras_prefix: str, ignore_regions: bool = False
    ) -> None:
        self.format = format
        self.keeps_ignore_regions = ignore_regions
        self.attributes = set(attributes)
        self.extras_prefix = extras_prefix
        self.report = ReportBuilder()

    def visit(self, record) -> None:
        for name, values in record.attributes.items():
            if name in self.attributes or name not in ATTRIBUTE_DTYPES:
                continue
            set_count = int(np.count_nonzero(values))
            if set_count:
                self.report.add(
                    f"not written: attribute {name!r} (no {self.format} field for it)",
                    [record.box_sources[i] for i in np.flatnonzero(values)[:3]],
                    count=set_count,
                )
        if len(record.ignore_regions) and not self.keeps_ignore_regions:
            self.report.add(
                f"not written: ignore region (no {self.format} field for it)",
                record.source,
                count=len(record.ignore_regions),
            )
        for key in record.extras:
            if not key.startswith(self.extras_prefix) and record.num_boxes:
                self.report.add(
                    f"not written: per-box field {key!r} (no {self.format} field for it)",
                    record.source,
                    count=record.num_boxes,
                )

    def build(self) -> DatasetReport:
        return self.report.build()
