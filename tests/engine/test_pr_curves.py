"""Precision-recall figures: one line per class with ground truth, PNG output."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from detr.data.labelmap import LabelMap
from detr.engine.detections import ImageDetections
from detr.engine.evaluation import Evaluator
from detr.engine.pr_curves import coco_curves, pr_figure, save_figure, voc_curves
from detr.engine.voc_eval import evaluate_voc


def _lines(figure: Figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    (axes,) = figure.axes
    return {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in axes.get_lines()}


def test_voc_curves_one_line_per_class_with_ground_truth(random_problem, tmp_path):
    dataset, predictions = random_problem(0, num_images=20, num_classes=4)
    evaluator = Evaluator(dataset)
    evaluator.update(predictions)
    metrics = evaluator.compute()
    result = evaluator.last_result  # what the tracking code draws after the trainer's compute()
    assert result is not None and result.metrics is metrics
    figure = pr_figure(voc_curves(result.voc), title="VOC PR @0.5")
    lines = _lines(figure)
    assert len(lines) == 4
    for c in result.voc.classes:
        label = f"{c.name} (AP {c.ap:.3f})"
        assert label in lines
        recall, precision = lines[label]
        assert recall[0] == 0.0 and recall[-1] == pytest.approx(c.recall[-1])
        assert np.all(np.diff(precision) <= 0)  # the interpolated envelope never rises
    assert "mean AP" in figure.axes[0].get_title()
    path = save_figure(figure, tmp_path / "plots" / "voc_pr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    coco_lines = _lines(pr_figure(coco_curves(result.coco, iou=0.5)))
    assert len(coco_lines) == 4
    for k, name in enumerate(result.coco.class_names):
        (label,) = [label for label in coco_lines if label.startswith(f"{name} (AP ")]
        np.testing.assert_array_equal(coco_lines[label][1], result.coco.precision[0, :, k, 0, -1])


def test_voc_curve_staircase_matches_its_ap(make_record):
    # 2 GT; TP, FP, TP: envelope 1 up to recall 1/2, then 2/3 -> area 5/6 = AP.
    boxes = [[0, 0, 20, 20], [50, 50, 90, 80]]
    detections = ImageDetections(np.array([boxes[0], [100, 100, 120, 120], boxes[1]], float),
                                 np.array([0.9, 0.8, 0.7]), np.zeros(3, np.int64))  # fmt: skip
    result = evaluate_voc([make_record(0, boxes, [0, 0])], [detections], LabelMap(("a", "b")))
    curves = voc_curves(result)
    assert list(curves) == ["a"]  # class b has no ground truth: no curve
    curve = curves["a"]
    np.testing.assert_allclose(curve.recall, [0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(curve.precision, [1, 1, 2 / 3, 2 / 3])
    # steps-pre: precision[i] holds on (recall[i-1], recall[i]]
    area = np.sum(np.diff(curve.recall) * curve.precision[1:])
    assert area == pytest.approx(result.classes[0].ap) == pytest.approx(5 / 6)


def test_figure_without_curves_says_so():
    figure = pr_figure({})
    assert _lines(figure) == {}
    assert "no class has ground truth" in [t.get_text() for t in figure.axes[0].texts]
