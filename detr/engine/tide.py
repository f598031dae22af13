"""Error breakdown of a detector following TIDE (Bolya et al., ECCV 2020): which mistakes cost AP.

Every false positive and every missed object at AP50 gets one of six types, and each type is worth
the AP it would add if all its errors were fixed (``dAP``, fixing one type at a time). The
definitions, with foreground IoU ``t_f`` = 0.5 and background IoU ``t_b`` = 0.1, checked in this
order for each false positive:

* ``loc`` (localization): right class, ``t_b <= IoU <= t_f`` with an object of its class. Fixed by
  moving the box onto that object (it becomes a true positive).
* ``cls`` (classification): ``IoU >= t_f`` with an object of another class. Fixed by giving the
  detection that class.
* ``dupe`` (duplicate): ``IoU >= t_f`` with an object of its class already matched by a
  higher-scored detection. Fixed by removing the detection.
* ``bkg`` (background): ``IoU <= t_b`` with every object. Fixed by removing it.
* ``both`` (classification and localization): anything else (wrong class, ``t_b < IoU < t_f``).
  Fixed by removing it.
* ``miss`` (missed): an object no detection matched and no ``cls``/``loc`` error could be turned
  into (fixing those already finds it). Fixed by no longer counting the object.

A ``cls`` or ``loc`` fix can turn only one detection into a true positive per object, and only if
no detection matched the object already: the highest-scored candidate is fixed, the others are
removed. Two more numbers bound what is possible: ``fp`` (every false positive scored below every
true positive: perfect precision at the same recall) and ``fn`` (every missed object found:
perfect recall at the same precision).

The rules, the order of checks, and the AP are those of the reference implementation, ``tidecv``
(which the tests compare against): detections are matched per image in score order to the unmatched
object of their class with the highest IoU (>= ``t_f``), at most 100 detections per image; crowd
and difficult boxes and ignore regions excuse an unmatched detection of their class (any class for
an ignore region) whose intersection over the detection's area is above ``t_f``; the AP is the
101-point interpolated area of COCO; the mean is taken over the classes that have ground truth or
detections (a class with detections but no ground truth counts as AP 0, where COCO leaves it out;
otherwise ``ap`` equals COCO's AP50). dAPs are clipped at 0, as in tidecv. Numbers are fractions
(tidecv prints them multiplied by 100). IoU is pycocotools' ``mask.iou`` on boxes, as in tidecv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from detr.data.records import ImageRecord
from detr.engine.detections import ImageDetections
from detr.engine.evaluated_truth import ANY_CLASS, evaluated_truth, xywh

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
SPECIAL_TYPES = ("fp", "fn")
ERROR_NAMES = {
    "cls": "classification",
    "loc": "localization",
    "both": "class and location",
    "dupe": "duplicate",
    "bkg": "background",
    "miss": "missed",
    "fp": "all false positives",
    "fn": "all false negatives",
}
RECALL_POINTS = np.arange(101) / 100.0  # tidecv's x / 100 for x in 0..100


@dataclass(frozen=True)
class TideResult:
    """What fixing each error type would add to AP50.

    Attributes:
        ap: the mean AP at IoU ``pos_threshold`` before any fix (fraction), NaN without classes.
        delta_ap: error type -> dAP (``ERROR_TYPES`` then ``SPECIAL_TYPES``), fractions >= 0.
        counts: error type -> number of errors of that type (``ERROR_TYPES``).
        pos_threshold, bg_threshold: ``t_f`` and ``t_b``.
    """

    ap: float
    delta_ap: dict[str, float]
    counts: dict[str, int]
    pos_threshold: float = 0.5
    bg_threshold: float = 0.1

    def metrics(self, prefix: str = "tide") -> dict[str, float]:
        """``tide/AP50``, ``tide/dAP/<type>`` and ``tide/errors/<type>`` (counts)."""
        tag = f"AP{round(self.pos_threshold * 100)}"
        out = {f"{prefix}/{tag}": self.ap}
        out.update({f"{prefix}/dAP/{name}": value for name, value in self.delta_ap.items()})
        out.update({f"{prefix}/errors/{name}": float(count) for name, count in self.counts.items()})
        return out

    def to_dict(self) -> dict:
        return {"ap": self.ap, "delta_ap": dict(self.delta_ap), "counts": dict(self.counts),
                "pos_threshold": self.pos_threshold, "bg_threshold": self.bg_threshold,
                "error_names": {k: ERROR_NAMES[k] for k in self.delta_ap}}  # fmt: skip


@dataclass
class _Detection:
    class_id: int
    score: float
    true_positive: bool
    error: str | None = None
    target: int | None = None  # cls/loc: the global index of the object a fix would match


@dataclass
class _Tally:
    """Everything the AP of a fixed version needs: detections and objects in evaluation order."""

    detections: list[_Detection] = field(default_factory=list)  # counted ones, image then score order
    num_objects: dict[int, int] = field(default_factory=dict)  # class -> objects to find
    object_class: list[int] = field(default_factory=list)  # global object index -> class
    matched: list[bool] = field(default_factory=list)
    fixable: list[bool] = field(default_factory=list)  # a cls/loc error can find it
    best_fix: dict[int, int] = field(default_factory=dict)  # object -> detection that a fix turns into a TP
    classes: dict[int, None] = field(default_factory=dict)  # classes with objects or detections, in order


def evaluate_tide(
    records: Sequence[ImageRecord],
    detections: Sequence[ImageDetections],
    *,
    pos_threshold: float = 0.5,
    bg_threshold: float = 0.1,
    max_detections: int = 100,
) -> TideResult:
    """The TIDE error breakdown of ``detections[i]`` against ``records[i]`` (aligned lists)."""
    if len(records) != len(detections):
        raise ValueError(f"{len(records)} records but {len(detections)} detection sets")
    tally = _Tally()
    for record, det in zip(records, detections):
        _tally_image(tally, record, det, pos_threshold, bg_threshold, max_detections)
    base = _mean_ap(tally, None)
    delta = {}
    for kind in ERROR_TYPES:
        delta[kind] = _clip(_mean_ap(tally, {kind}) - base)
    delta["fp"] = _clip(_mean_ap(tally, set(), perfect_precision=True) - base)
    delta["fn"] = _clip(_mean_ap(tally, set(), perfect_recall=True) - base)
    counts = {kind: sum(d.error == kind for d in tally.detections) for kind in ERROR_TYPES if kind != "miss"}
    counts["miss"] = sum(not m and not f for m, f in zip(tally.matched, tally.fixable))
    counts = {kind: counts[kind] for kind in ERROR_TYPES}
    return TideResult(base, delta, counts, pos_threshold, bg_threshold)


def _clip(value: float) -> float:
    # tidecv: a negative dAP comes from the recall binning of the AP; it is reported as 0.
    return value if math.isnan(value) else max(value, 0.0)


def _tally_image(tally: _Tally, record: ImageRecord, det: ImageDetections, pos: float, bg: float,
                 max_detections: int) -> None:
    truth = evaluated_truth(record)
    first_object = len(tally.object_class)
    for label in truth.labels.tolist():
        tally.num_objects[label] = tally.num_objects.get(label, 0) + 1
        tally.classes.setdefault(label)
        tally.object_class.append(label)
        tally.matched.append(False)
        tally.fixable.append(False)
    if len(det) == 0:
        return
    order = np.argsort(-det.scores, kind="stable")[:max_detections]
    boxes, labels, scores = det.boxes[order], det.labels[order], det.scores[order]
    num_d, num_g = len(order), len(truth)
    matched_gt = np.zeros(num_g, dtype=bool)
    true_positive = np.zeros(num_d, dtype=bool)
    if num_g:
        iou = np.asarray(mask_utils.iou(xywh(boxes), xywh(truth.boxes), [0] * num_g)).reshape(num_d, num_g)
        same_class = labels[:, None] == truth.labels[None, :]
        class_iou = iou * same_class
        available = class_iou.copy()
        for d in range(num_d):
            g = int(available[d].argmax())
            if available[d, g] >= pos:
                true_positive[d] = matched_gt[g] = True
                available[:, g] = 0.0
    ignored = np.zeros(num_d, dtype=bool)
    if len(truth.ignore_boxes):
        inside = np.asarray(mask_utils.iou(xywh(boxes), xywh(truth.ignore_boxes), [1] * len(truth.ignore_boxes)))
        inside = inside.reshape(num_d, len(truth.ignore_boxes))  # intersection / detection area
        their_class = (truth.ignore_labels[None, :] == labels[:, None]) | (truth.ignore_labels[None, :] == ANY_CLASS)
        ignored = ~true_positive & ((inside > pos) & their_class).any(axis=1)
    for g in np.flatnonzero(matched_gt):
        tally.matched[first_object + g] = True
    for d in range(num_d):
        if ignored[d]:
            continue
        detection = _Detection(int(labels[d]), float(scores[d]), bool(true_positive[d]))
        tally.detections.append(detection)
        tally.classes.setdefault(detection.class_id)
        if detection.true_positive:
            continue
        if num_g == 0:
            detection.error = "bkg"
            continue
        g = int(class_iou[d].argmax())
        if bg <= class_iou[d, g] <= pos:
            _candidate_fix(tally, detection, "loc", first_object + g, matched_gt[g])
            continue
        other_class = iou[d] * ~same_class[d]
        g = int(other_class.argmax())
        if other_class[g] >= pos:
            _candidate_fix(tally, detection, "cls", first_object + g, matched_gt[g])
            continue
        matched_class = iou[d] * same_class[d] * matched_gt
        if matched_class.max() >= pos:
            detection.error = "dupe"
        elif iou[d].max() <= bg:
            detection.error = "bkg"
        else:
            detection.error = "both"


def _candidate_fix(tally: _Tally, detection: _Detection, kind: str, target: int, target_matched: bool) -> None:
    """A cls/loc error; its fix finds ``target`` if no detection did and no higher-scored error will."""
    detection.error = kind
    if target_matched:
        return  # the fix can only remove it
    detection.target = target
    tally.fixable[target] = True
    best = tally.best_fix.get(target)
    if best is None or tally.detections[best].score < detection.score:
        tally.best_fix[target] = len(tally.detections) - 1


def _mean_ap(tally: _Tally, fixed: set[str] | None, *, perfect_precision: bool = False,
             perfect_recall: bool = False) -> float:
    """Mean AP over the classes with objects or detections after fixing the errors of ``fixed``
    (``None``: the AP as evaluated, nothing fixed)."""
    points: dict[int, list[tuple[float, bool]]] = {c: [] for c in tally.classes}
    num_objects = {c: tally.num_objects.get(c, 0) for c in tally.classes}
    if fixed is None:
        for detection in tally.detections:
            points[detection.class_id].append((detection.score, detection.true_positive))
        return _mean_over_classes(tally, points, num_objects)
    # Errors first, then the true positives, each in evaluation order: the order tidecv builds a
    # fixed version in (it decides the rank of equal scores; the unfixed AP keeps evaluation order).
    for index, detection in enumerate(tally.detections):
        if detection.true_positive:
            continue
        if detection.error in fixed:
            if detection.error in ("cls", "loc") and detection.target is not None \
                    and tally.best_fix[detection.target] == index:
                class_id = tally.object_class[detection.target] if detection.error == "cls" else detection.class_id
                points[class_id].append((detection.score, True))
            continue  # removed
        points[detection.class_id].append((0.0 if perfect_precision else detection.score, False))
    for detection in tally.detections:
        if detection.true_positive:
            points[detection.class_id].append((1.0 if perfect_precision else detection.score, True))
    for obj, class_id in enumerate(tally.object_class):
        found = tally.matched[obj]
        if ("miss" in fixed and not found and not tally.fixable[obj]) or (perfect_recall and not found):
            num_objects[class_id] -= 1
    return _mean_over_classes(tally, points, num_objects)


def _mean_over_classes(tally: _Tally, points: dict[int, list[tuple[float, bool]]],
                       num_objects: dict[int, int]) -> float:
    aps = [_average_precision(points[c], num_objects[c]) for c in tally.classes if points[c] or num_objects[c]]
    return float(np.mean(aps)) if aps else math.nan


def _average_precision(points: list[tuple[float, bool]], num_objects: int) -> float:
    """COCO's 101-point interpolated AP of one class; 0 without objects to find."""
    if num_objects == 0:
        return 0.0
    scores = np.array([s for s, _ in points], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    hits = np.array([t for _, t in points], dtype=bool)[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / num_objects
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # envelope: best precision at higher recall
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0) if len(hits) else \
        np.zeros(len(RECALL_POINTS))
    return float(sampled.mean())
