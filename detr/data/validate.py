"""Checks every reader applies to boxes and images, and the repair policy.

Box rules (all formats, after conversion to xyxy absolute pixels):

* every coordinate is a finite number;
* ``x1 <= x2`` and ``y1 <= y2`` (an *inverted* box is an error, or dropped and counted with
  ``repair.drop_degenerate_boxes``);
* ``0 <= x1``, ``x2 <= width``, ``0 <= y1``, ``y2 <= height``; a box at most
  ``repair.clip_boxes_px`` pixels outside the image is clipped and counted, farther is an error;
* after clipping, ``x1 < x2`` and ``y1 < y2`` (a *zero-area* box is an error, or dropped and
  counted with ``repair.drop_degenerate_boxes``).

The checks are vectorized over all boxes of a file (a COCO file holds ~10^6 boxes), so each call
takes arrays, not one box. Image checks read only the file header (``PIL.Image.open(...).size``),
which finds missing, unreadable and wrongly sized images without decoding pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from detr.config import RepairPolicy
from detr.data.dataset import ReportBuilder
from detr.errors import DatasetFormatError

STRICT = RepairPolicy()

Where = Sequence[str] | Callable[[int], str]


def _place(where: Where, index: int) -> str:
    return where(index) if callable(where) else where[index]


def _places(where: Where, indices: np.ndarray) -> list[str]:
    return [_place(where, int(i)) for i in indices[:3]]


def _fmt_box(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box.tolist()) + "]"


class BoxChecker:
    """Applies the box rules with a :class:`~detr.config.RepairPolicy`, counting repairs."""

    def __init__(self, policy: RepairPolicy | None, report: ReportBuilder) -> None:
        self.policy = policy if policy is not None else STRICT
        self.report = report

    def check(
        self,
        boxes: np.ndarray,
        width: np.ndarray | float,
        height: np.ndarray | float,
        where: Where,
        *,
        describe: Callable[[int], str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate and repair ``boxes``.

        Args:
            boxes: float64 [N, 4] xyxy absolute pixels.
            width, height: the image size of each box ([N] arrays or scalars).
            where: the location of each box (a sequence of N strings, or index -> string).
            describe: optional index -> how the box was written in the file, for messages of
                formats whose coordinates are not xyxy pixels (YOLO's normalized cx cy w h).

        Returns:
            (float32 [M, 4] checked boxes, bool [N] keep mask) with M = keep.sum(). The checks
            apply to the boxes rounded to float32, the precision records hold.
        """
        # Check the float32 values the record will hold, not the float64 arithmetic that made them:
        # COCO's x + w or YOLO's (cx + w / 2) * W may land 1e-13 px past the border and round back.
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf: reported non-finite
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).astype(np.float32).astype(np.float64)
        n = len(boxes)
        keep = np.ones(n, dtype=bool)
        if n == 0:
            return boxes.astype(np.float32), keep
        width = np.broadcast_to(np.asarray(width, dtype=np.float64), (n,))
        height = np.broadcast_to(np.asarray(height, dtype=np.float64), (n,))

        def shown(i: int) -> str:
            text = f"box (x1, y1, x2, y2) = {_fmt_box(boxes[i])}"
            return f"{describe(i)} -> {text}" if describe else text

        bad = ~np.isfinite(boxes).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DatasetFormatError(f"{_place(where, i)}: {shown(i)} has a non-finite coordinate")

        x1, y1, x2, y2 = boxes.T
        inverted = (x2 < x1) | (y2 < y1)
        if inverted.any():
            idx = np.flatnonzero(inverted)
            if not self.policy.drop_degenerate_boxes:
                i = int(idx[0])
                raise DatasetFormatError(
                    f"{_place(where, i)}: inverted {shown(i)}; expected x1 <= x2 and y1 <= y2 "
                    "(set data.repair.drop_degenerate_boxes to drop such boxes)"
                )
            self.report.add("drop: inverted box (x2 < x1 or y2 < y1)", _places(where, idx), count=len(idx))
            keep &= ~inverted

        outside = np.maximum.reduce([-x1, -y1, x2 - width, y2 - height, np.zeros(n)])
        tolerance = self.policy.clip_boxes_px
        too_far = keep & (outside > tolerance)
        if too_far.any():
            i = int(np.flatnonzero(too_far)[0])
            hint = (
                f"boxes up to data.repair.clip_boxes_px = {tolerance:g} px outside are clipped"
                if tolerance
                else "set data.repair.clip_boxes_px to clip boxes slightly outside"
            )
            raise DatasetFormatError(
                f"{_place(where, i)}: {shown(i)} lies {outside[i]:g} px outside the "
                f"{width[i]:g}x{height[i]:g} image; expected 0 <= x1, x2 <= width, 0 <= y1, "
                f"y2 <= height ({hint})"
            )
        clipped = keep & (outside > 0)
        if clipped.any():
            idx = np.flatnonzero(clipped)
            self.report.add(
                f"repair: box clipped to the image (<= {tolerance:g} px outside)",
                _places(where, idx),
                count=len(idx),
            )
            boxes = boxes.copy()
            boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width[:, None])
            boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height[:, None])
            x1, y1, x2, y2 = boxes.T

        zero = keep & ((x2 <= x1) | (y2 <= y1))
        if zero.any():
            idx = np.flatnonzero(zero)
            if not self.policy.drop_degenerate_boxes:
                i = int(idx[0])
                raise DatasetFormatError(
                    f"{_place(where, i)}: zero-area {shown(i)}; expected x1 < x2 and y1 < y2 "
                    "(set data.repair.drop_degenerate_boxes to drop such boxes)"
                )
            self.report.add("drop: zero-area box", _places(where, idx), count=len(idx))
            keep &= ~zero
        return boxes[keep].astype(np.float32), keep


def read_image_size(path: Path, *, referenced_by: str) -> tuple[int, int]:
    """(width, height) from the image header; a missing or unreadable file is an error."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DatasetFormatError(f"{referenced_by}: image file {path} not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        raise DatasetFormatError(f"{referenced_by}: cannot read image {path} ({e})") from None


def check_image_size(path: Path, width: int, height: int, *, referenced_by: str) -> None:
    """The header size of ``path`` must equal the annotated ``width`` x ``height``."""
    actual = read_image_size(path, referenced_by=referenced_by)
    if actual != (width, height):
        raise DatasetFormatError(
            f"{referenced_by}: annotated image size {width}x{height} does not match the file "
            f"{path} ({actual[0]}x{actual[1]})"
        )


def read_text(path: Path) -> str:
    """The text of an annotation file; a missing, unreadable or non-UTF-8 file is an error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DatasetFormatError(f"{path}: cannot read file ({e.strerror})") from None


def check_unique(values: Sequence, where: Sequence[str], what: str) -> None:
    """Raise naming both places when a value (image id, file name) occurs twice.

    ``where[i]`` is only looked up for the duplicate, so it may be a lazy sequence.
    """
    if len(set(values)) == len(values):
        return
    first: dict = {}
    for i, value in enumerate(values):
        if value in first:
            raise DatasetFormatError(
                f"{where[i]}: duplicate {what} {value!r} (first at {where[first[value]]})"
            )
        first[value] = i
