"""The one record type every format adapter produces.

Contract (DESIGN.md "Records"): boxes are float32 [N, 4] xyxy in absolute pixels of the image,
``labels`` are int64 [N] contiguous ids into the dataset's :class:`~detr.data.labelmap.LabelMap`,
and every box keeps the place it came from so an error can name the file and line/object.
Per-box attributes exist only where the source format has them (``None`` otherwise), so writing a
record back to its own format loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# Attribute name -> dtype. ``iscrowd`` (COCO), ``difficult`` (VOC), ``occluded`` (VOC 0/1, KITTI
# 0..3), ``truncated`` (VOC 0/1, KITTI 0.0..1.0).
ATTRIBUTE_DTYPES: dict[str, type] = {
    "iscrowd": np.bool_,
    "difficult": np.bool_,
    "occluded": np.int64,
    "truncated": np.float32,
}

_ATTRIBUTE_NAMES = frozenset(ATTRIBUTE_DTYPES)
_FLOAT32, _INT64 = np.dtype(np.float32), np.dtype(np.int64)


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image.

    Attributes:
        image_path: absolute path of the image file.
        width, height: image size in pixels as declared by the annotation (checked against the
            file when the image is decoded).
        boxes: float32 [N, 4] (x1, y1, x2, y2) absolute pixels, 0 <= x1 < x2 <= width.
        labels: int64 [N] contiguous class ids, 0 <= id < len(label_map).
        attributes: name -> array [N] for the attributes in ``ATTRIBUTE_DTYPES`` the format has.
        box_sources: N strings, where each box was read ("ann.json: annotations[12] (id=57)").
        source: where the image entry itself was read ("ann.json: images[3] (id=7)").
        image_id: a stable id: COCO's image id, else the file stem.
        ignore_regions: float32 [R, 4] xyxy regions that must not count as false positives
            (KITTI DontCare); empty when the format has none.
        extras: format-specific per-box fields kept only for a lossless write back to the same
            format (e.g. KITTI 3D fields float32 [N, 8], COCO annotation ids int64 [N]).
    """

    image_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    box_sources: tuple[str, ...]
    source: str
    image_id: int | str
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    ignore_regions: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Internal invariants only: adapters validate user data and raise DatasetFormatError first.
        # Kept cheap (dtype objects compared, no temporaries): a COCO file builds ~10^5 records.
        n = len(self.labels)
        if self.boxes.shape != (n, 4) or self.boxes.dtype != _FLOAT32:
            raise ValueError(f"boxes must be float32 [{n}, 4], got {self.boxes.dtype} {self.boxes.shape}")
        if self.labels.dtype != _INT64:
            raise ValueError(f"labels must be int64, got {self.labels.dtype}")
        if len(self.box_sources) != n:
            raise ValueError(f"{len(self.box_sources)} box sources for {n} boxes")
        for per_box in (self.attributes, self.extras):
            for name, values in per_box.items():
                if len(values) != n:
                    raise ValueError(f"per-box field {name!r} has {len(values)} entries for {n} boxes")
        if not _ATTRIBUTE_NAMES.issuperset(self.attributes):
            unknown = set(self.attributes) - _ATTRIBUTE_NAMES
            raise ValueError(f"unknown attributes {sorted(unknown)}; known: {sorted(ATTRIBUTE_DTYPES)}")

    @property
    def num_boxes(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> ImageRecord:
        """The same image with only the boxes where ``keep`` (bool [N]) is true."""
        keep = np.asarray(keep, dtype=bool)
        return replace(
            self,
            boxes=self.boxes[keep],
            labels=self.labels[keep],
            box_sources=tuple(s for s, k in zip(self.box_sources, keep) if k),
            attributes={k: v[keep] for k, v in self.attributes.items()},
            extras={k: v[keep] for k, v in self.extras.items()},
        )

    def relabel(self, old_to_new: np.ndarray) -> ImageRecord:
        """Map ids through ``old_to_new`` (int64 [K_old], -1 = class removed) and drop removed boxes."""
        new_labels = old_to_new[self.labels] if self.num_boxes else self.labels
        kept = self.select(new_labels >= 0)
        return replace(kept, labels=new_labels[new_labels >= 0].astype(np.int64))


def empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)
