"""Confusion matrix at one score threshold and IoU 0.5, with a background row and column.

Rows are the ground-truth class, columns the predicted class; the last row and column are
"background". ``counts[t, p]`` with t, p < K: objects of class t found by a detection of class p
(the diagonal: found with the right class). ``counts[t, K]``: objects of class t no detection found
(missed). ``counts[K, p]``: detections of class p that found no object (spurious: background, a
duplicate, or a box too far off). ``counts[K, K]`` is always 0.

Only detections scoring at least ``score_threshold`` take part: the matrix shows what a served
model returning those detections gets right and wrong. Matching, per image, detections in
descending score order (ties: detection order):

1. each detection takes the unmatched object of its own class with the highest IoU >= 0.5 (as the
   VOC/COCO matching of a true positive, so the diagonal equals the true positives at that score);
2. each detection still unmatched takes the unmatched object of any class with the highest
   IoU >= 0.5 (a class confusion, off the diagonal);
3. a detection still unmatched is excused (counted in ``ignored``, not in the matrix) when it lies
   inside a crowd box, a difficult box or an ignore region of any class (intersection over its own
   area >= 0.5, which any IoU >= 0.5 implies): those objects are not evaluated, so they make no
   error; otherwise it is spurious.

Crowd and difficult boxes are not objects to find (see :mod:`detr.engine.evaluated_truth`), so a
row's sum is the number of objects of that class the VOC evaluation counts. IoU is
``torchvision.ops.box_iou``; intersection over area is pycocotools' crowd IoU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from detr.data.records import ImageRecord
from detr.engine.detections import ImageDetections
from detr.engine.evaluated_truth import EvaluatedTruth, evaluated_truth, xywh

BACKGROUND = "background"
ANNOTATE_MAX_CLASSES = 25  # beyond this the numbers in the cells are unreadable

# Outcome codes of one detection / one object.
CORRECT, CONFUSED, SPURIOUS, IGNORED = 0, 1, 2, 3
FOUND, MISSED = 0, 2  # objects: CONFUSED (1) when found by a detection of another class


@dataclass(frozen=True)
class ImageMatch:
    """The matching of one image at the threshold.

    Attributes:
        kept: int64 [D] indices into the image's detections of those scoring >= the threshold,
            in descending score order.
        outcome: int64 [D] per kept detection: CORRECT, CONFUSED, SPURIOUS or IGNORED.
        matched_object: int64 [D] the object (index into ``truth``) each found, -1 if none.
        truth: the image's ground truth split into objects and excusing regions.
        object_outcome: int64 [G] per object: FOUND, CONFUSED or MISSED.
    """

    kept: np.ndarray
    outcome: np.ndarray
    matched_object: np.ndarray
    truth: EvaluatedTruth
    object_outcome: np.ndarray

    def counts(self) -> dict[str, int]:
        """Correct, confused, spurious, missed, ignored (detections / objects of this image)."""
        return {
            "correct": int((self.outcome == CORRECT).sum()),
            "confused": int((self.outcome == CONFUSED).sum()),
            "spurious": int((self.outcome == SPURIOUS).sum()),
            "missed": int((self.object_outcome == MISSED).sum()),
            "ignored": int((self.outcome == IGNORED).sum()),
        }

    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN): 1 for an image without objects and without detections.

        A confused object is both a false positive (its detection) and a false negative.
        """
        c = self.counts()
        errors = c["confused"] * 2 + c["spurious"] + c["missed"]
        return 1.0 if c["correct"] + errors == 0 else 2 * c["correct"] / (2 * c["correct"] + errors)


def match_image(record: ImageRecord, det: ImageDetections, score_threshold: float,
                iou_threshold: float = 0.5) -> ImageMatch:
    """Match the detections of one image that score >= ``score_threshold`` (module docstring)."""
    truth = evaluated_truth(record)
    kept = np.flatnonzero(det.scores >= score_threshold)
    kept = kept[np.argsort(-det.scores[kept], kind="stable")]
    boxes, labels = det.boxes[kept], det.labels[kept]
    num_d, num_g = len(kept), len(truth)
    outcome = np.full(num_d, SPURIOUS, dtype=np.int64)
    matched_object = np.full(num_d, -1, dtype=np.int64)
    object_outcome = np.full(num_g, MISSED, dtype=np.int64)
    if num_d and num_g:
        iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(truth.boxes)).numpy()  # [D, G]
        same_class = labels[:, None] == truth.labels[None, :]
        for own_class_only in (True, False):
            for d in range(num_d):
                if matched_object[d] >= 0:
                    continue
                candidates = np.where((object_outcome == MISSED) & (same_class[d] | (not own_class_only)),
                                      iou[d], -1.0)
                g = int(candidates.argmax())
                if candidates[g] >= iou_threshold:
                    matched_object[d] = g
                    outcome[d] = CORRECT if same_class[d, g] else CONFUSED
                    object_outcome[g] = FOUND if same_class[d, g] else CONFUSED
    spurious = np.flatnonzero(outcome == SPURIOUS)
    if len(spurious) and len(truth.ignore_boxes):
        regions = truth.ignore_boxes
        # Intersection over the detection's area (pycocotools' crowd IoU) >= the threshold.
        inside = np.asarray(mask_utils.iou(xywh(boxes[spurious]), xywh(regions), [1] * len(regions)))
        excused = (inside.reshape(len(spurious), len(regions)) >= iou_threshold).any(axis=1)
        outcome[spurious[excused]] = IGNORED
    return ImageMatch(kept, outcome, matched_object, truth, object_outcome)


@dataclass(frozen=True)
class ConfusionMatrix:
    """Attributes:
        counts: int64 [K+1, K+1], rows ground truth, columns prediction, last = background.
        class_names: the K class names.
        score_threshold, iou_threshold: where it was taken.
        ignored: detections excused by crowd/difficult boxes or ignore regions.
    """

    counts: np.ndarray
    class_names: tuple[str, ...]
    score_threshold: float
    iou_threshold: float
    ignored: int

    @property
    def labels(self) -> tuple[str, ...]:
        return (*self.class_names, BACKGROUND)

    def normalized(self) -> np.ndarray:
        """float64 [K+1, K+1]: each row divided by its sum (an object row: where the objects of that
        class went, the diagonal is the recall; the background row: which classes the spurious
        detections claimed). A row without entries is all 0."""
        sums = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, sums, out=np.zeros(self.counts.shape), where=sums > 0)

    def recall(self, class_id: int) -> float:
        """Objects of the class found with the right class / objects of the class (NaN if none)."""
        total = self.counts[class_id].sum()
        return float(self.counts[class_id, class_id] / total) if total else math.nan

    def precision(self, class_id: int) -> float:
        """Detections of the class that found an object of it / detections of the class (NaN if none)."""
        total = self.counts[:, class_id].sum()
        return float(self.counts[class_id, class_id] / total) if total else math.nan

    def totals(self) -> dict[str, int]:
        k = len(self.class_names)
        correct = int(np.trace(self.counts[:k, :k]))
        return {
            "objects": int(self.counts[:k].sum()),
            "detections": int(self.counts[:, :k].sum()),
            "correct": correct,
            "confused": int(self.counts[:k, :k].sum()) - correct,
            "missed": int(self.counts[:k, k].sum()),
            "spurious": int(self.counts[k, :k].sum()),
            "ignored": self.ignored,
        }

    def most_confused(self, class_id: int) -> tuple[str, int] | None:
        """The other class that objects of ``class_id`` were most often predicted as, and how often."""
        row = self.counts[class_id, : len(self.class_names)].copy()
        row[class_id] = 0
        other = int(row.argmax())
        return (self.class_names[other], int(row[other])) if row[other] > 0 else None

    def confusions(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """The largest off-diagonal class-to-class counts: (true class, predicted class, count)."""
        k = len(self.class_names)
        cells = [(int(self.counts[t, p]), t, p) for t in range(k) for p in range(k) if t != p and self.counts[t, p]]
        cells.sort(key=lambda c: (-c[0], c[1], c[2]))
        return [(self.class_names[t], self.class_names[p], n) for n, t, p in cells[:limit]]

    def to_dict(self) -> dict:
        """JSON-able: labels, both matrices, the thresholds and the axis meaning."""
        return {
            "labels": list(self.labels),
            "rows": "ground truth class (last: background = spurious detections)",
            "columns": "predicted class (last: background = missed objects)",
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "counts": self.counts.tolist(),
            "normalized": [[round(v, 6) for v in row] for row in self.normalized().tolist()],
            "ignored_detections": self.ignored,
        }

    def figure(self) -> Figure:
        """Counts and row-normalized matrices side by side (a Figure with a raster canvas)."""
        k1 = len(self.labels)
        side = min(4.0 + 0.45 * k1, 14.0)
        figure = Figure(figsize=(2 * side + 1.5, side + 0.8), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        normalized = self.normalized()
        for index, (values, title) in enumerate(((self.counts, "counts"), (normalized, "normalized by row"))):
            axes = figure.add_subplot(1, 2, index + 1)
            shown = normalized  # colour by share of the row in both panels: counts of big classes don't drown the rest
            image = axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0)
            if k1 <= ANNOTATE_MAX_CLASSES:
                for t in range(k1):
                    for p in range(k1):
                        if t == p == k1 - 1:
                            continue
                        text = f"{values[t, p]:d}" if values.dtype.kind == "i" else f"{values[t, p]:.2f}"
                        axes.text(p, t, text, ha="center", va="center", fontsize=8,
                                  color="white" if shown[t, p] > 0.6 else "black")
            axes.set_xticks(range(k1), self.labels, rotation=45, ha="right", fontsize=8)
            axes.set_yticks(range(k1), self.labels, fontsize=8)
            axes.set_xlabel("predicted class (background: missed)")
            axes.set_ylabel("ground truth (background: spurious)")
            axes.set_title(title)
            if index == 1:
                figure.colorbar(image, ax=axes, shrink=0.8)
        figure.suptitle(f"Confusion at score >= {self.score_threshold:.2f}, IoU >= {self.iou_threshold:.2f}")
        return figure


def confusion_matrix(
    records: Sequence[ImageRecord],
    detections: Sequence[ImageDetections],
    class_names: Sequence[str],
    score_threshold: float,
    iou_threshold: float = 0.5,
) -> tuple[ConfusionMatrix, list[ImageMatch]]:
    """The confusion matrix of ``detections[i]`` against ``records[i]`` and each image's matching."""
    if len(records) != len(detections):
        raise ValueError(f"{len(records)} records but {len(detections)} detection sets")
    k = len(class_names)
    counts = np.zeros((k + 1, k + 1), dtype=np.int64)
    matches, ignored = [], 0
    for record, det in zip(records, detections):
        match = match_image(record, det, score_threshold, iou_threshold)
        matches.append(match)
        labels = det.labels[match.kept]
        for d in range(len(match.kept)):
            if match.outcome[d] == IGNORED:
                ignored += 1
            elif match.matched_object[d] >= 0:
                counts[match.truth.labels[match.matched_object[d]], labels[d]] += 1
            else:
                counts[k, labels[d]] += 1
        np.add.at(counts[:, k], match.truth.labels[match.object_outcome == MISSED], 1)
    matrix = ConfusionMatrix(counts, tuple(class_names), float(score_threshold), float(iou_threshold), ignored)
    return matrix, matches
