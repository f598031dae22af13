"""COCO box mAP through pycocotools, built in memory from records and detections.

Ground truth: one COCO ``images`` entry per evaluated record (id = its position in the dataset + 1,
so ids are stable whatever subset is evaluated), one category per label-map class (category id =
class id + 1), one annotation per box with ``bbox`` = [x, y, w, h] and ``area`` = w * h (box area:
records carry boxes only, so COCO datasets are bucketed small/medium/large by box area, not by the
segmentation area the official COCO numbers use). ``iscrowd`` is 1 for:

* boxes whose ``iscrowd`` attribute is set (COCO crowd annotations);
* boxes whose ``difficult`` attribute is set (VOC): the VOC protocol counts a detection on a
  difficult object as neither right nor wrong, and a COCO crowd region is the only way to say
  "ignore detections here" to COCOeval;
* every ignore region (KITTI DontCare), once per category: a DontCare region has no class, and
  COCOeval matches crowd regions per category. A detection of any class that lies inside such a
  region (intersection / detection area >= the IoU threshold) is then ignored, not a false positive.

Detections go through ``COCO.loadRes`` from an N x 7 array [image_id, x, y, w, h, score,
category_id] (see :func:`load_detections`); matching and accumulation are pycocotools' own
``COCOeval``. The numbers equal the usual file path (``COCO(gt.json)``,
``loadRes(dt.json)``, ``COCOeval``), which the tests check. pycocotools prints progress and the
summary table; it is captured into :attr:`CocoResult.summary` so the caller decides what to show.

COCOeval reports -1 where a number is undefined (no ground truth of a class, of an area range, or
no images at all); :class:`CocoResult` reports those as NaN.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.engine.detections import ImageDetections

# Order of COCOeval.stats for bounding boxes.
STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip


@dataclass(frozen=True)
class CocoResult:
    """What a COCO evaluation produced.

    Attributes:
        stats: the 12 summary numbers by name (``STAT_NAMES``), NaN where COCOeval reports -1.
        per_class_ap: class name -> AP@[.5:.95] (area all, 100 detections), NaN without ground truth.
        precision: COCOeval ``eval['precision']`` float64 [T, R, K, A, M] (-1 = undefined).
        iou_thresholds: float64 [T]; recall_thresholds: float64 [R] (the axes of ``precision``).
        class_names: the K class names in category order.
        summary: the text pycocotools printed (progress lines and the summary table).
    """

    stats: dict[str, float]
    per_class_ap: dict[str, float]
    precision: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    class_names: tuple[str, ...]
    summary: str

    def metrics(self, prefix: str = "coco") -> dict[str, float]:
        """Flat names: ``coco/AP`` ... ``coco/AR_large``, then ``coco/AP/<class name>``."""
        out = {f"{prefix}/{name}": value for name, value in self.stats.items()}
        out.update({f"{prefix}/AP/{name}": value for name, value in self.per_class_ap.items()})
        return out

    def pr_curve(self, class_index: int, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray] | None:
        """(recall [R], precision [R]) of one class at IoU ``iou``, area all, 100 detections.

        ``None`` when the class has no ground truth (COCOeval leaves -1 there).
        """
        t = np.flatnonzero(np.isclose(self.iou_thresholds, iou))
        if len(t) == 0:
            raise ValueError(f"IoU {iou} is not one of the evaluated thresholds {self.iou_thresholds.tolist()}")
        row = self.precision[t[0], :, class_index, 0, -1]
        if (row < 0).any():
            return None
        return self.recall_thresholds.copy(), row.copy()


def coco_image_ids(dataset_positions: Sequence[int]) -> list[int]:
    """COCO image ids for records at these positions in their dataset (1-based, stable)."""
    return [int(i) + 1 for i in dataset_positions]


def ground_truth_dict(records: Sequence[ImageRecord], label_map: LabelMap, image_ids: Sequence[int]) -> dict:
    """The COCO-format ground truth of ``records`` as a JSON-able dict (see the module docstring)."""
    images, annotations = [], []
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(label_map.names)]
    for record, image_id in zip(records, image_ids):
        images.append({"id": int(image_id), "width": int(record.width), "height": int(record.height),
                       "file_name": str(record.image_path)})  # fmt: skip
        crowd = np.zeros(record.num_boxes, dtype=bool)
        for name in ("iscrowd", "difficult"):
            if name in record.attributes:
                crowd |= np.asarray(record.attributes[name], dtype=bool)
        boxes = record.boxes.astype(np.float64)  # [N, 4] xyxy; float32 -> float64 is exact
        for box, label, is_crowd in zip(boxes.tolist(), record.labels.tolist(), crowd.tolist()):
            annotations.append(_annotation(len(annotations) + 1, image_id, label + 1, box, is_crowd))
        for region in np.asarray(record.ignore_regions, dtype=np.float64).reshape(-1, 4).tolist():
            for category in categories:
                annotations.append(_annotation(len(annotations) + 1, image_id, category["id"], region, True))
    return {"images": images, "annotations": annotations, "categories": categories}


def _annotation(ann_id: int, image_id: int, category_id: int, xyxy: list[float], crowd: bool) -> dict:
    # Ids start at 1: COCOeval treats a match id of 0 as "unmatched".
    x1, y1, x2, y2 = xyxy
    w, h = x2 - x1, y2 - y1
    return {"id": ann_id, "image_id": int(image_id), "category_id": int(category_id),
            "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(crowd)}  # fmt: skip


def detections_array(detections: Sequence[ImageDetections], image_ids: Sequence[int]) -> np.ndarray:
    """float64 [N, 7] rows [image_id, x, y, w, h, score, category_id] for ``COCO.loadRes``.

    Images follow ``image_ids`` order and each image keeps its detection order, so the result does
    not depend on the order in which predictions arrived.
    """
    rows = []
    for det, image_id in zip(detections, image_ids):
        if len(det) == 0:
            continue
        xywh = det.boxes.copy()  # [K, 4] float64
        xywh[:, 2:] -= xywh[:, :2]
        rows.append(np.column_stack([np.full(len(det), float(image_id)), xywh, det.scores, det.labels + 1.0]))
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def load_ground_truth(gt: dict) -> COCO:
    """A ``COCO`` object from an in-memory dict, without a JSON file."""
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_detections(coco_gt: COCO, rows: np.ndarray) -> COCO:
    """``loadRes`` of the N x 7 rows; with no rows, an empty result set (``loadRes`` cannot take one).

    The rows go in as the list of result dicts that ``loadRes`` builds from an array (and reads
    from a JSON file), with Python floats: the same values, without ``loadNumpyAnnotations``'
    per-element numpy indexing, which takes longer than the evaluation itself.
    """
    if len(rows):
        results = [
            {"image_id": int(image_id), "bbox": [x, y, w, h], "score": score, "category_id": int(category)}
            for image_id, x, y, w, h, score, category in rows.tolist()
        ]
        return coco_gt.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}  # fmt: skip
    empty.createIndex()
    return empty


def evaluate_coco(
    records: Sequence[ImageRecord],
    detections: Sequence[ImageDetections],
    label_map: LabelMap,
    image_ids: Sequence[int] | None = None,
) -> CocoResult:
    """COCO box metrics of ``detections[i]`` against ``records[i]``.

    Args:
        records, detections: aligned, one entry per evaluated image (no detections = empty).
        label_map: the classes, in id order.
        image_ids: COCO image ids for the records (default 1..N); see :func:`coco_image_ids`.
    """
    if len(records) != len(detections):
        raise ValueError(f"{len(records)} records but {len(detections)} detection sets")
    image_ids = list(image_ids) if image_ids is not None else list(range(1, len(records) + 1))
    names = tuple(label_map.names)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), _garbage_collection_paused():
        coco_gt = load_ground_truth(ground_truth_dict(records, label_map, image_ids))
        coco_dt = load_detections(coco_gt, detections_array(detections, image_ids))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, name in enumerate(names):
        values = precision[:, :, k, 0, -1]
        per_class[name] = float(values[values > -1].mean()) if (values > -1).any() else math.nan
    return CocoResult(
        stats={name: _nan_if_undefined(v) for name, v in zip(STAT_NAMES, evaluator.stats)},
        per_class_ap=per_class,
        precision=precision,
        iou_thresholds=np.asarray(evaluator.params.iouThrs, dtype=np.float64),
        recall_thresholds=np.asarray(evaluator.params.recThrs, dtype=np.float64),
        class_names=names,
        summary=captured.getvalue(),
    )


@contextlib.contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while pycocotools builds ~10 small objects per box.

    Those allocations trigger collections that walk the whole heap (large once torch is loaded):
    they make up over half of the time of building the COCO objects, and free nothing (the
    annotation dicts hold no reference cycles).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _nan_if_undefined(value: float) -> float:
    return math.nan if value == -1 else float(value)
