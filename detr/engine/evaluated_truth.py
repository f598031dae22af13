"""Which ground truth of a record counts as an object to find, and which only excuses detections.

The same split the COCO and VOC evaluations make (see :mod:`detr.engine.coco_eval`): a box marked
``iscrowd`` (COCO) or ``difficult`` (VOC) is not an object to find, and a detection on it is
neither right nor wrong; an ignore region (KITTI DontCare) has no class and excuses a detection of
any class lying inside it. The confusion matrix and the error breakdown use this split, so their
object counts equal the recall denominators of the VOC evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detr.data.records import ImageRecord

ANY_CLASS = -1  # the class of an ignore region: it excuses detections of every class


@dataclass(frozen=True)
class EvaluatedTruth:
    """One record's ground truth, split.

    Attributes:
        boxes: float64 [G, 4] xyxy pixels of the objects to find; labels: int64 [G].
        index: int64 [G] the position of each object among the record's boxes.
        ignore_boxes: float64 [R, 4] xyxy crowd boxes, difficult boxes and ignore regions.
        ignore_labels: int64 [R] their class, ``ANY_CLASS`` for an ignore region.
    """

    boxes: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    ignore_boxes: np.ndarray
    ignore_labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def evaluated_truth(record: ImageRecord) -> EvaluatedTruth:
    """Split ``record``'s boxes into objects to find and regions that excuse detections."""
    excused = np.zeros(record.num_boxes, dtype=bool)
    for name in ("iscrowd", "difficult"):
        if name in record.attributes:
            excused |= np.asarray(record.attributes[name], dtype=bool)
    boxes = record.boxes.astype(np.float64).reshape(-1, 4)
    labels = record.labels.astype(np.int64)
    regions = np.asarray(record.ignore_regions, dtype=np.float64).reshape(-1, 4)
    return EvaluatedTruth(
        boxes=boxes[~excused],
        labels=labels[~excused],
        index=np.flatnonzero(~excused).astype(np.int64),
        ignore_boxes=np.concatenate([boxes[excused], regions]),
        ignore_labels=np.concatenate([labels[excused], np.full(len(regions), ANY_CLASS, np.int64)]),
    )


def xywh(xyxy: np.ndarray) -> np.ndarray:
    """float64 [N, 4] (x, y, w, h): the box layout pycocotools' ``mask.iou`` takes."""
    out = np.array(xyxy, dtype=np.float64).reshape(-1, 4)
    out[:, 2:] -= out[:, :2]
    return out
