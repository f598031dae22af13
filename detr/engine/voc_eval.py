"""Pascal VOC average precision per class at one IoU threshold (mAP@0.5 by default).

Matching follows the official VOC devkit (VOCevaldet.m): within each class, detections are taken in
descending score order; a detection's best ground truth is the one (of the same image and class,
difficult ones included) with the highest IoU, the first on ties. If that IoU >= the threshold:

* the ground truth is difficult -> the detection is ignored (neither TP nor FP);
* the ground truth is not yet detected -> TP, and it becomes detected;
* it is already detected -> FP (a duplicate), even when another free ground truth overlaps enough.

Otherwise the detection is a FP -- unless it lies inside a crowd box of its class (COCO ``iscrowd``)
or an ignore region (KITTI DontCare, any class) with intersection / detection area >= the
threshold, in which case it is ignored, as COCOeval does with crowd regions. Crowd boxes and
difficult boxes do not count as ground truth to find (recall denominator).

Differences from the devkit, on purpose:

* Coordinates are continuous: IoU is ``torchvision.ops.box_iou`` on xyxy pixels with no "+1"
  (the devkit counts a box [1, 1, 10, 10] as 10 pixels wide, our data layer as 9).
* Score ties are broken by image order in the evaluated set, then by detection order, with a
  stable sort, so results do not depend on the sort algorithm or on prediction batch order.
* The 11-point recall thresholds are the doubles nearest to 0.0, 0.1, ..., 1.0 (k / 10).
  ``np.arange(0, 1.1, 0.1)`` (some Python ports) and ``np.linspace(0, 1, 11)`` yield
  0.30000000000000004 (3 * 0.1), which a recall of exactly 3/10 does not reach.
* A class with no ground truth in the evaluated images has AP NaN and is left out of the mean.

Two AP definitions: VOC2007's 11-point interpolated AP (mean over recall thresholds 0, 0.1, ..., 1
of the highest precision at recall >= the threshold) and VOC2010+'s area under the interpolated
(monotone non-increasing) precision-recall curve, summed at every recall change ("all points").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.engine.detections import ImageDetections

ELEVEN_RECALL_THRESHOLDS = np.arange(11) / 10.0  # exactly the doubles nearest to 0.0, 0.1, ..., 1.0


@dataclass(frozen=True)
class ClassResult:
    """VOC result of one class.

    Attributes:
        name: class name.
        ap: area under the interpolated PR curve (VOC2010+); NaN without ground truth.
        ap_11pt: 11-point interpolated AP (VOC2007); NaN without ground truth.
        recall, precision: float64 [D] after each counted (non-ignored) detection in score order.
        scores: float64 [D] the scores of those detections.
        num_ground_truth: boxes to find (not difficult, not crowd).
        num_ignored: detections ignored (on difficult/crowd boxes or ignore regions).
    """

    name: str
    ap: float
    ap_11pt: float
    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray
    num_ground_truth: int
    num_ignored: int


@dataclass(frozen=True)
class VocResult:
    classes: tuple[ClassResult, ...]
    iou_threshold: float

    @property
    def map(self) -> float:
        return _mean_defined([c.ap for c in self.classes])

    @property
    def map_11pt(self) -> float:
        return _mean_defined([c.ap_11pt for c in self.classes])

    def metrics(self, prefix: str = "voc") -> dict[str, float]:
        """``voc/mAP50``, ``voc/mAP50_11pt``, ``voc/AP50/<class>``, ``voc/AP50_11pt/<class>``.

        The number in the names is the IoU threshold in percent.
        """
        tag = f"AP{round(self.iou_threshold * 100)}"
        out = {f"{prefix}/m{tag}": self.map, f"{prefix}/m{tag}_11pt": self.map_11pt}
        out.update({f"{prefix}/{tag}/{c.name}": c.ap for c in self.classes})
        out.update({f"{prefix}/{tag}_11pt/{c.name}": c.ap_11pt for c in self.classes})
        return out


def _mean_defined(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the interpolated PR curve (VOC2010+ devkit ``VOCap``).

    ``recall``/``precision`` are the points after each detection in score order.
    """
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: max at any higher recall
    change = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def average_precision_11pt(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t."""
    total = 0.0
    for t in ELEVEN_RECALL_THRESHOLDS:
        reached = precision[recall >= t]
        total += float(reached.max()) if len(reached) else 0.0
    return total / len(ELEVEN_RECALL_THRESHOLDS)


def match_image(
    det_boxes: np.ndarray,
    det_labels: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    gt_difficult: np.ndarray,
    regions: np.ndarray,
    region_labels: np.ndarray,
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Devkit matching of one image, all classes at once; detections in descending score order.

    Args:
        det_boxes: float64 [D, 4] xyxy; det_labels: int64 [D].
        gt_boxes: float64 [G, 4] xyxy ground truth to find or ignore (no crowd boxes);
            gt_labels: int64 [G]; gt_difficult: bool [G].
        regions: float64 [R, 4] xyxy regions matched by intersection / detection area (crowd
            boxes, DontCare); region_labels: int64 [R], -1 for a region of every class.
    Returns:
        ``true_positive`` and ``ignored``, both bool [D]; a detection that is neither is a FP.

    A detection's best ground truth does not depend on which ones are already detected, so the
    devkit's sequential loop reduces to: among detections whose best match reaches the threshold
    on a non-difficult ground truth, the first (highest-scored) one per ground truth is a TP and
    the rest are duplicates.
    """
    num_d = len(det_boxes)
    true_positive = np.zeros(num_d, dtype=bool)
    ignored = np.zeros(num_d, dtype=bool)
    unmatched = np.ones(num_d, dtype=bool)
    if num_d and len(gt_boxes):
        ious = box_iou(torch.from_numpy(det_boxes), torch.from_numpy(gt_boxes)).numpy()  # [D, G]
        ious[det_labels[:, None] != gt_labels[None, :]] = -1.0  # only the detection's own class
        best_gt = ious.argmax(axis=1)  # first maximum, as the devkit's max()
        best_iou = ious[np.arange(num_d), best_gt]
        hit = best_iou >= iou_threshold
        unmatched = ~hit
        ignored = hit & gt_difficult[best_gt]
        counted = np.flatnonzero(hit & ~ignored)
        _, first = np.unique(best_gt[counted], return_index=True)
        true_positive[counted[first]] = True
    if len(regions) and unmatched.any():
        candidates = np.flatnonzero(unmatched)
        inside = np.asarray(
            mask_utils.iou(_xywh(det_boxes[candidates]), _xywh(regions), [1] * len(regions))
        ).reshape(len(candidates), len(regions))  # [C, R] intersection / detection area
        same_class = (region_labels[None, :] < 0) | (region_labels[None, :] == det_labels[candidates, None])
        ignored[candidates[((inside >= iou_threshold) & same_class).any(axis=1)]] = True
    return true_positive, ignored


def _xywh(xyxy: np.ndarray) -> np.ndarray:
    out = np.array(xyxy, dtype=np.float64)
    out[:, 2:] -= out[:, :2]
    return out


def evaluate_voc(
    records: Sequence[ImageRecord],
    detections: Sequence[ImageDetections],
    label_map: LabelMap,
    iou_threshold: float = 0.5,
) -> VocResult:
    """Per-class VOC AP of ``detections[i]`` against ``records[i]`` (aligned lists)."""
    if len(records) != len(detections):
        raise ValueError(f"{len(records)} records but {len(detections)} detection sets")
    num_classes = len(label_map)
    num_gt = np.zeros(num_classes, dtype=np.int64)
    # Over all images, in record order then score order: label, score, TP, ignored.
    labels, scores, true_positive, ignored = [], [], [], []
    for record, det in zip(records, detections):
        difficult = np.zeros(record.num_boxes, dtype=bool)
        if "difficult" in record.attributes:
            difficult = np.asarray(record.attributes["difficult"], dtype=bool)
        crowd = np.zeros(record.num_boxes, dtype=bool)
        if "iscrowd" in record.attributes:
            crowd = np.asarray(record.attributes["iscrowd"], dtype=bool)
        num_gt += np.bincount(record.labels[~difficult & ~crowd], minlength=num_classes)
        if len(det) == 0:
            continue
        order = np.argsort(-det.scores, kind="stable")  # ties keep the prediction's order
        gt_boxes = record.boxes.astype(np.float64)
        dontcare = np.asarray(record.ignore_regions, dtype=np.float64).reshape(-1, 4)
        tp, ig = match_image(
            det.boxes[order],
            det.labels[order],
            gt_boxes[~crowd],
            record.labels[~crowd],
            difficult[~crowd],
            np.concatenate([dontcare, gt_boxes[crowd]]),
            np.concatenate([np.full(len(dontcare), -1, np.int64), record.labels[crowd]]),
            iou_threshold,
        )
        labels.append(det.labels[order])
        scores.append(det.scores[order])
        true_positive.append(tp)
        ignored.append(ig)
    if labels:
        labels_all, scores_all = np.concatenate(labels), np.concatenate(scores)
        tp_all, ignored_all = np.concatenate(true_positive), np.concatenate(ignored)
    else:
        labels_all, scores_all = np.zeros(0, np.int64), np.zeros(0)
        tp_all, ignored_all = np.zeros(0, bool), np.zeros(0, bool)
    results = []
    for class_id, name in enumerate(label_map.names):
        mine = labels_all == class_id
        result = _class_result(name, scores_all[mine], tp_all[mine], ignored_all[mine], int(num_gt[class_id]))
        results.append(result)
    return VocResult(tuple(results), iou_threshold)


def _class_result(name: str, scores: np.ndarray, tp: np.ndarray, ignored: np.ndarray, num_gt: int) -> ClassResult:
    """AP of one class from its detections (images in record order, each in score order)."""
    # Stable over images in record order: ties rank the earlier image first.
    order = np.argsort(-scores, kind="stable")
    counted = order[~ignored[order]]  # ignored detections change neither TP nor FP counts
    tp_sum = np.cumsum(tp[counted])
    fp_sum = np.cumsum(~tp[counted])
    recall = tp_sum / num_gt if num_gt else np.full(len(counted), math.nan)
    precision = tp_sum / np.maximum(tp_sum + fp_sum, 1)
    if num_gt:
        ap, ap_11pt = average_precision(recall, precision), average_precision_11pt(recall, precision)
    else:
        ap = ap_11pt = math.nan
    return ClassResult(
        name=name,
        ap=ap,
        ap_11pt=ap_11pt,
        recall=recall.astype(np.float64),
        precision=precision.astype(np.float64),
        scores=scores[counted],
        num_ground_truth=num_gt,
        num_ignored=int(ignored.sum()),
    )
