"""Precision-recall curves per class as a matplotlib Figure (for ``mlflow.log_figure``) or a PNG.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, not pyplot: no
global figure registry to leak memory across epochs, no GUI backend needed on a headless trainer.
Curves come from a VOC evaluation (the points after every counted detection, with the
interpolated envelope the AP is computed from) or from COCOeval's ``eval['precision']`` at one IoU
threshold (already interpolated, sampled at COCO's 101 recall thresholds). Classes without ground
truth have no curve and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detr.engine.coco_eval import CocoResult
from detr.engine.voc_eval import VocResult

LEGEND_MAX_CLASSES = 30  # beyond this a legend hides the plot; the title still gives the mean AP


@dataclass(frozen=True)
class Curve:
    """One class's curve: recall and precision float64 [P], and the AP it summarises.

    ``drawstyle`` is matplotlib's: "steps-pre" draws precision[i] over (recall[i-1], recall[i]],
    the interpolated staircase; "default" joins sampled points.
    """

    recall: np.ndarray
    precision: np.ndarray
    ap: float
    drawstyle: str = "default"


def voc_curves(result: VocResult) -> dict[str, Curve]:
    """Interpolated PR curve of every class with ground truth, from a VOC evaluation.

    The curve starts at recall 0 and is the precision envelope (the highest precision at any
    recall >= r), the staircase whose area is the all-point AP.
    """
    curves = {}
    for c in result.classes:
        if c.num_ground_truth == 0:
            continue
        recall = np.concatenate([[0.0], c.recall])
        precision = np.concatenate([[c.precision[0] if len(c.precision) else 0.0], c.precision])
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        curves[c.name] = Curve(recall, precision, c.ap, drawstyle="steps-pre")
    return curves


def coco_curves(result: CocoResult, iou: float = 0.5) -> dict[str, Curve]:
    """COCOeval's interpolated PR curve at IoU ``iou`` (area all, 100 detections) per class.

    ``ap`` is the mean precision over the recall thresholds, i.e. the class's COCO AP at that IoU.
    """
    curves = {}
    for k, name in enumerate(result.class_names):
        curve = result.pr_curve(k, iou)
        if curve is not None:
            recall, precision = curve
            curves[name] = Curve(recall, precision, float(precision.mean()))
    return curves


def pr_figure(curves: Mapping[str, Curve], title: str = "Precision-recall") -> Figure:
    """A Figure with one line per class (legend: class name and AP) on [0, 1] x [0, 1] axes."""
    figure = Figure(figsize=(8.0, 6.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attach a raster canvas: savefig / log_figure work without pyplot
    axes = figure.add_subplot()
    for name, curve in curves.items():
        ap = "n/a" if math.isnan(curve.ap) else f"{curve.ap:.3f}"
        axes.plot(curve.recall, curve.precision, drawstyle=curve.drawstyle, linewidth=1.5,
                  label=f"{name} (AP {ap})")  # fmt: skip
    defined = [c.ap for c in curves.values() if not math.isnan(c.ap)]
    mean = f" (mean AP {np.mean(defined):.3f} over {len(defined)} classes)" if defined else ""
    axes.set_title(title + mean)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.grid(True, alpha=0.3)
    if not curves:
        axes.text(0.5, 0.5, "no class has ground truth", ha="center", va="center", transform=axes.transAxes)
    elif len(curves) <= LEGEND_MAX_CLASSES:
        axes.legend(loc="best", fontsize="small", ncols=1 if len(curves) <= 12 else 2)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (parent directories are created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
