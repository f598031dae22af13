"""Evaluation you can act on: per-class numbers, the confusion matrix, the TIDE error breakdown,
the worst images, and a short summary in words.

Computed from one evaluation pass (the records and detections the :class:`Evaluator` holds, in
dataset order, so nothing depends on batch size or data-parallel ranks) at the score threshold a
served model applies (``DEFAULT_SCORE_THRESHOLD`` unless told otherwise):

* per class: COCO AP and AP50 (all detections), and at the threshold the recall, precision, number
  of objects and the class its objects were most often predicted as;
* the confusion matrix (:mod:`detr.engine.confusion`) and the TIDE breakdown (:mod:`detr.engine.tide`);
* the worst images: ranked by their F1 at the threshold (2 TP / (2 TP + FP + FN), IoU 0.5, a
  confused object counting as one FP and one FN), lowest first, then by the number of errors, then
  dataset order; images with F1 = 1 are never "worst". Drawn with both ground truth and
  predictions and a caption naming the threshold and what went wrong.

Nothing here calls MLflow: :class:`DiagnosticReport` hands figures, dicts, tables and images to the
tracking layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.utils import draw_bounding_boxes

from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.show import class_colour
from detr.engine.coco_eval import CocoResult
from detr.engine.confusion import CONFUSED, CORRECT, MISSED, SPURIOUS, ConfusionMatrix, ImageMatch, confusion_matrix
from detr.engine.detections import ImageDetections
from detr.engine.drawing import add_caption, display_scale, scale_image
from detr.engine.tide import ERROR_NAMES, ERROR_TYPES, SPECIAL_TYPES, TideResult, evaluate_tide

NUM_WORST_IMAGES = 6
GROUND_TRUTH_COLOUR = "white"
ERROR_COLOUR = "#ff2a2a"  # missed objects, confused and spurious detections


@dataclass(frozen=True)
class ClassDiagnostics:
    name: str
    ap: float  # COCO AP@[.5:.95]
    ap50: float  # COCO AP at IoU 0.5
    recall: float  # at the score threshold, IoU 0.5
    precision: float
    objects: int  # objects to find (crowd and difficult boxes excluded)
    most_confused: str | None  # the class its objects were most often predicted as
    confused: int  # how often


@dataclass(frozen=True)
class ImageDiagnosis:
    position: int  # in the dataset
    image_id: int | str
    f1: float
    counts: dict[str, int]
    problems: str  # "2 missed (circle, square); 1 spurious (square 0.81)"


@dataclass(frozen=True)
class Diagnostics:
    score_threshold: float
    confusion: ConfusionMatrix
    tide: TideResult
    classes: tuple[ClassDiagnostics, ...]
    worst: tuple[ImageDiagnosis, ...]
    num_images: int

    def metrics(self) -> dict[str, float]:
        """``tide/...`` (see :meth:`TideResult.metrics`) and, at the threshold, ``confusion/precision``,
        ``confusion/recall``, ``confusion/f1``, ``confusion/recall/<class>``, ``confusion/precision/<class>``."""
        totals = self.confusion.totals()
        precision = totals["correct"] / totals["detections"] if totals["detections"] else math.nan
        recall = totals["correct"] / totals["objects"] if totals["objects"] else math.nan
        f1 = 2 * totals["correct"] / (totals["detections"] + totals["objects"]) if totals["objects"] else math.nan
        out = {"confusion/score_threshold": self.score_threshold, "confusion/precision": precision,
               "confusion/recall": recall, "confusion/f1": f1}  # fmt: skip
        for c in self.classes:
            out[f"confusion/recall/{c.name}"] = c.recall
            out[f"confusion/precision/{c.name}"] = c.precision
        out.update(self.tide.metrics())
        return out

    def per_class_table(self) -> dict[str, list]:
        """Columns of the per-class table (for ``mlflow.log_table`` or a DataFrame)."""
        rows = self.classes
        return {
            "class": [c.name for c in rows],
            "AP": [c.ap for c in rows],
            "AP50": [c.ap50 for c in rows],
            f"recall@{self.score_threshold:.2f}": [c.recall for c in rows],
            f"precision@{self.score_threshold:.2f}": [c.precision for c in rows],
            "objects": [c.objects for c in rows],
            "most_confused_with": [c.most_confused or "" for c in rows],
            "times_confused": [c.confused for c in rows],
        }

    def worst_table(self) -> dict[str, list]:
        return {
            "image_id": [str(w.image_id) for w in self.worst],
            "f1": [w.f1 for w in self.worst],
            **{key: [w.counts[key] for w in self.worst] for key in ("correct", "confused", "spurious", "missed")},
            "problems": [w.problems for w in self.worst],
        }

    def to_dict(self) -> dict:
        return {"score_threshold": self.score_threshold, "iou_threshold": self.confusion.iou_threshold,
                "images": self.num_images, "totals": self.confusion.totals(),
                "per_class": self.per_class_table(), "worst_images": self.worst_table(),
                "tide": self.tide.to_dict(), "summary": self.summary()}  # fmt: skip

    def summary(self, max_classes: int = 3) -> str:
        """A few lines in words: what was found, what was confused, what the errors cost, where."""
        t = self.confusion.totals()
        thr = f"score >= {self.score_threshold:.2f}"
        lines = [f"at {thr} and IoU {self.confusion.iou_threshold:.2f}, over {self.num_images} images:"]
        if t["objects"]:
            lines.append(f"  found {t['correct']} of {t['objects']} objects with the right class "
                         f"(recall {t['correct'] / t['objects']:.2f}); {t['confused']} with a wrong class, "
                         f"{t['missed']} missed")  # fmt: skip
        else:
            lines.append("  the images hold no objects to find")
        if t["detections"]:
            lines.append(f"  {t['detections']} detections: {t['correct']} right (precision "
                         f"{t['correct'] / t['detections']:.2f}), {t['spurious']} on no object")
        else:
            lines.append(f"  no detection scores {self.score_threshold:.2f} or more: the model finds nothing at "
                         f"this threshold (a lower --score-threshold shows what it would find)")
        confusions = self.confusion.confusions(limit=3)
        if confusions:
            lines.append("  most confused: " + ", ".join(f"{t_} predicted as {p} ({n}x)" for t_, p, n in confusions))
        ranked = sorted(((v, k) for k, v in self.tide.delta_ap.items() if k in ERROR_TYPES), reverse=True)
        if not math.isnan(self.tide.ap):
            lines.append(f"  AP50 {self.tide.ap:.3f}; fixing each error type would add (TIDE dAP50): "
                         + ", ".join(f"{ERROR_NAMES[k]} {v:.3f}" for v, k in ranked))
        with_objects = [c for c in self.classes if c.objects]
        weakest = sorted(with_objects, key=lambda c: (_nan_last(c.ap), c.name))[:max_classes]
        if weakest:
            lines.append("  weakest classes: " + "; ".join(
                f"{c.name} AP {c.ap:.3f} recall {c.recall:.2f}"
                + (f" (confused with {c.most_confused} {c.confused}x)" if c.most_confused else "") for c in weakest))
        if self.worst:
            lines.append("  worst images: " + "; ".join(f"{w.image_id} (F1 {w.f1:.2f}: {w.problems})"
                                                        for w in self.worst[:3]))
        return "\n".join(lines)

    def tide_figure(self) -> Figure:
        """Bars of dAP50 per error type (with their counts), and the two bounds (fp, fn)."""
        figure = Figure(figsize=(9.0, 4.0), dpi=100, layout="constrained")
        FigureCanvasAgg(figure)
        main, special = figure.subplots(1, 2, width_ratios=[3, 1.3])
        values = [self.tide.delta_ap[k] for k in ERROR_TYPES]
        labels = [f"{ERROR_NAMES[k]}\n({self.tide.counts[k]})" for k in ERROR_TYPES]
        colours = ["#e15759", "#f28e2b", "#b07aa1", "#76b7b2", "#4e79a7", "#59a14f"]
        bars = main.barh(labels[::-1], values[::-1], color=colours[::-1])
        main.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
        main.set_xlabel("AP50 that fixing every error of the type would add")
        main.set_title("main errors (count)")
        extra = [self.tide.delta_ap[k] for k in SPECIAL_TYPES]
        bars = special.bar(["false\npositives", "false\nnegatives"], extra, color=["#bab0ac", "#9c755f"])
        special.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
        special.set_title("all FP / all FN fixed")
        top = max([*values, *extra, 0.01])
        main.set_xlim(0, top * 1.25)
        special.set_ylim(0, top * 1.25)
        ap = "n/a" if math.isnan(self.tide.ap) else f"{self.tide.ap:.3f}"
        figure.suptitle(f"TIDE error breakdown (AP50 {ap})")
        return figure


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def diagnose(
    records: Sequence[ImageRecord],
    detections: Sequence[ImageDetections],
    positions: Sequence[int],
    label_map: LabelMap,
    coco: CocoResult | None,
    score_threshold: float,
    *,
    num_worst: int = NUM_WORST_IMAGES,
) -> tuple[Diagnostics, list[ImageMatch]]:
    """The diagnostics of ``detections[i]`` against ``records[i]`` (dataset positions ``positions``),
    plus each image's matching at the threshold (to draw it)."""
    names = tuple(label_map.names)
    matrix, matches = confusion_matrix(records, detections, names, score_threshold)
    tide = evaluate_tide(records, detections)
    classes = []
    for k, name in enumerate(names):
        ap = coco.per_class_ap[name] if coco is not None else math.nan
        curve = coco.pr_curve(k, 0.5) if coco is not None else None
        confused = matrix.most_confused(k)
        classes.append(ClassDiagnostics(
            name=name, ap=ap, ap50=float(curve[1].mean()) if curve is not None else math.nan,
            recall=matrix.recall(k), precision=matrix.precision(k), objects=int(matrix.counts[k].sum()),
            most_confused=confused[0] if confused else None, confused=confused[1] if confused else 0,
        ))  # fmt: skip
    diagnosed = [_diagnose_image(p, r, d, m, names) for p, r, d, m in zip(positions, records, detections, matches)]
    order = sorted((i for i, d in enumerate(diagnosed) if d.f1 < 1.0),
                   key=lambda i: (diagnosed[i].f1, -_errors(diagnosed[i]), i))
    worst = tuple(diagnosed[i] for i in order[:num_worst])
    result = Diagnostics(float(score_threshold), matrix, tide, tuple(classes), worst, len(records))
    return result, matches


def _errors(diagnosis: ImageDiagnosis) -> int:
    c = diagnosis.counts
    return c["confused"] + c["spurious"] + c["missed"]


def _diagnose_image(position: int, record: ImageRecord, det: ImageDetections, match: ImageMatch,
                    names: tuple[str, ...]) -> ImageDiagnosis:
    counts = match.counts()
    problems = []
    missed = match.truth.labels[match.object_outcome == MISSED]
    if len(missed):
        problems.append(f"{len(missed)} missed ({', '.join(names[c] for c in missed)})")
    confused = np.flatnonzero(match.outcome == CONFUSED)
    if len(confused):
        pairs = [f"{names[match.truth.labels[match.matched_object[d]]]} as {names[det.labels[match.kept[d]]]}"
                 for d in confused]
        problems.append(f"{len(confused)} confused ({', '.join(pairs)})")
    spurious = np.flatnonzero(match.outcome == SPURIOUS)
    if len(spurious):
        found = [f"{names[det.labels[match.kept[d]]]} {det.scores[match.kept[d]]:.2f}" for d in spurious]
        problems.append(f"{len(spurious)} on no object ({', '.join(found)})")
    if not len(match.kept) and len(det):
        best = int(np.argmax(det.scores))
        problems.append(f"no detection passes the threshold (best: {names[det.labels[best]]} {det.scores[best]:.2f})")
    return ImageDiagnosis(int(position), record.image_id, match.f1(), counts, "; ".join(problems) or "none")


def draw_diagnosis(image: torch.Tensor, record: ImageRecord, det: ImageDetections, match: ImageMatch,
                   diagnosis: ImageDiagnosis, names: Sequence[str], score_threshold: float) -> np.ndarray:
    """uint8 [H', W', 3]: ``image`` ([3, H, W] uint8 pixels of ``record``) with the ground truth (white;
    missed objects red), the detections scoring >= the threshold (right: class colour; confused or on
    no object: red, with what they are) and a caption naming the threshold and what went wrong."""
    scale = display_scale(record.width, record.height)
    canvas = scale_image(image, scale)
    truth = match.truth
    if len(truth):
        missed = match.object_outcome == MISSED
        boxes = torch.from_numpy(truth.boxes * scale).float()
        captions = [f"missed {names[c]}" if m else "" for c, m in zip(truth.labels.tolist(), missed.tolist())]
        colours = [ERROR_COLOUR if m else GROUND_TRUTH_COLOUR for m in missed.tolist()]
        canvas = draw_bounding_boxes(canvas, boxes, labels=captions, colors=colours, width=1)
    if len(match.kept):
        boxes = torch.from_numpy(det.boxes[match.kept] * scale).float()
        captions, colours = [], []
        for d, index in enumerate(match.kept.tolist()):
            label, score = int(det.labels[index]), float(det.scores[index])
            text = f"{names[label]} {score:.2f}"
            if match.outcome[d] == CONFUSED:
                text += f" (is {names[truth.labels[match.matched_object[d]]]})"
            elif match.outcome[d] == SPURIOUS:
                text += " (no object)"
            captions.append(text)
            colours.append(class_colour(label) if match.outcome[d] == CORRECT else ERROR_COLOUR)
        canvas = draw_bounding_boxes(canvas, boxes, labels=captions, colors=colours, width=2)
    lines = [f"image {record.image_id}: F1 {diagnosis.f1:.2f} at score >= {score_threshold:.2f}, IoU 0.5; "
             f"white: ground truth, red: errors",
             f"what went wrong: {diagnosis.problems}"]
    return add_caption(canvas, lines)


@dataclass(frozen=True)
class DiagnosticReport:
    """Diagnostics plus the drawn worst images: what the tracking layer logs and the CLI prints."""

    diagnostics: Diagnostics
    worst_images: tuple[tuple[str, np.ndarray], ...]  # (name, uint8 [H, W, 3])

    def metrics(self) -> dict[str, float]:
        return self.diagnostics.metrics()

    def figures(self) -> dict[str, Figure]:
        return {"confusion_matrix.png": self.diagnostics.confusion.figure(),
                "tide_errors.png": self.diagnostics.tide_figure()}

    def dicts(self) -> dict[str, dict]:
        return {"confusion_matrix.json": self.diagnostics.confusion.to_dict(),
                "diagnostics.json": self.diagnostics.to_dict()}

    def tables(self) -> dict[str, dict[str, list]]:
        return {"per_class.json": self.diagnostics.per_class_table(),
                "worst_images.json": self.diagnostics.worst_table()}

    def summary(self) -> str:
        return self.diagnostics.summary()


def build_report(
    records: Sequence[ImageRecord],
    detections: Sequence[ImageDetections],
    positions: Sequence[int],
    label_map: LabelMap,
    coco: CocoResult | None,
    score_threshold: float,
    *,
    num_worst: int = NUM_WORST_IMAGES,
    draw: bool = True,
) -> DiagnosticReport:
    """Diagnose and draw the worst images (reading their pixels) when ``draw``."""
    from detr.data.loader import read_rgb_image

    diagnostics, matches = diagnose(records, detections, positions, label_map, coco, score_threshold,
                                    num_worst=num_worst)
    drawn = []
    if draw:
        index_of = {int(p): i for i, p in enumerate(positions)}
        for rank, w in enumerate(diagnostics.worst, start=1):
            i = index_of[w.position]
            image = draw_diagnosis(read_rgb_image(records[i]), records[i], detections[i], matches[i], w,
                                   label_map.names, score_threshold)
            drawn.append((f"worst_{rank:02d}_image_{_safe(w.image_id)}.png", image))
    return DiagnosticReport(diagnostics, tuple(drawn))


def save_report(report: DiagnosticReport, directory: str | Path) -> list[Path]:
    """Write a report's charts (PNG), JSON, tables, summary and worst images into ``directory``."""
    from PIL import Image

    directory = Path(directory)
    (directory / "worst_images").mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in report.figures().items():
        figure.savefig(directory / name, format="png")
        written.append(directory / name)
    for name, data in {**report.dicts(), **report.tables()}.items():
        (directory / name).write_text(json.dumps(data, indent=1, default=_json_number) + "\n")
        written.append(directory / name)
    (directory / "summary.txt").write_text(report.summary() + "\n")
    written.append(directory / "summary.txt")
    for name, image in report.worst_images:
        Image.fromarray(image).save(directory / "worst_images" / name)
        written.append(directory / "worst_images" / name)
    return written


def _json_number(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _safe(image_id: int | str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(image_id))
