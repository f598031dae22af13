"""COCO evaluation: the in-memory path against stock pycocotools run through JSON files."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr.data.labelmap import LabelMap
from detr.engine.coco_eval import STAT_NAMES, evaluate_coco
from detr.engine.detections import detections_from_prediction


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _independent_file_reference(tmp_path, dataset, predictions):
    """Stock pycocotools through JSON files, the GT written here from the documented rules."""
    images, annotations = [], []
    num_classes = len(dataset.label_map)
    for position, record in enumerate(dataset.records):
        image_id = position + 1
        images.append({"id": image_id, "width": record.width, "height": record.height})
        crowd = record.attributes.get("iscrowd", np.zeros(record.num_boxes, bool)) | record.attributes.get(
            "difficult", np.zeros(record.num_boxes, bool)
        )
        entries = [(b, int(c) + 1, bool(k)) for b, c, k in zip(record.boxes, record.labels, crowd)]
        entries += [(region, k + 1, True) for region in record.ignore_regions for k in range(num_classes)]
        for box, category, is_crowd in entries:
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(is_crowd)})  # fmt: skip
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(dataset.label_map.names)]
    results = []
    ids = {r.image_id: i + 1 for i, r in enumerate(dataset.records)}
    for prediction in predictions:
        for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": ids[prediction["image_id"]], "category_id": int(label) + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})  # fmt: skip
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    dt_file.write_text(json.dumps(results))
    coco_gt = _quiet(COCO, str(gt_file))
    evaluator = COCOeval(coco_gt, _quiet(coco_gt.loadRes, str(dt_file)), "bbox")
    for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
        _quiet(step)
    return evaluator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_memory_evaluation_equals_the_json_file_path(tmp_path, random_problem, seed):
    dataset, predictions = random_problem(seed, num_images=40, num_classes=5)
    k = len(dataset.label_map)
    detections = [detections_from_prediction(p, k, "test") for p in predictions]
    result = evaluate_coco(dataset.records, detections, dataset.label_map)
    reference = _independent_file_reference(tmp_path, dataset, predictions)
    expected = [math.nan if v == -1 else v for v in reference.stats]
    np.testing.assert_array_equal([result.stats[n] for n in STAT_NAMES], expected)
    np.testing.assert_array_equal(result.precision, reference.eval["precision"])
    for index, name in enumerate(dataset.label_map.names):
        values = reference.eval["precision"][:, :, index, 0, -1]
        assert result.per_class_ap[name] == pytest.approx(values[values > -1].mean(), abs=0)
    assert result.stats["AP50"] > 0.1


def test_metric_names_and_stdout_is_captured(capsys, make_record, make_dataset):
    dataset = make_dataset([make_record("a", [[10, 10, 50, 60]], [0])], ["car", "person"])
    result = evaluate_coco(dataset.records, [detections_from_prediction(
        {"image_id": "a", "boxes": np.array([[10, 10, 50, 60]]), "scores": np.array([0.9]), "labels": np.array([0])},
        2, "test")], dataset.label_map)  # fmt: skip
    assert capsys.readouterr().out == ""
    assert "Average Precision" in result.summary and "maxDets=100" in result.summary
    metrics = result.metrics()
    expected = ["coco/AP", "coco/AP50", "coco/AP75", "coco/AP_small", "coco/AP_medium", "coco/AP_large",
                "coco/AR1", "coco/AR10", "coco/AR100", "coco/AR_small", "coco/AR_medium", "coco/AR_large",
                "coco/AP/car", "coco/AP/person"]  # fmt: skip
    assert list(metrics) == expected
    assert metrics["coco/AP"] == pytest.approx(1.0)
    assert metrics["coco/AP_medium"] == pytest.approx(1.0)  # 40 x 50 box: 32^2 < 2000 < 96^2
    assert math.isnan(metrics["coco/AP_small"]) and math.isnan(metrics["coco/AP_large"])  # -1 -> NaN
    assert math.isnan(metrics["coco/AP/person"])  # no ground truth of that class


def _detections(boxes, scores, labels):
    return detections_from_prediction(
        {"image_id": 0, "boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float),
         "labels": np.asarray(labels, np.int64)}, 10, "test")  # fmt: skip


def test_images_without_detections_and_empty_datasets(make_record, make_dataset):
    dataset = make_dataset([make_record(1, [[0, 0, 40, 40]], [0]), make_record(2, [], [])], ["car"])
    nothing = [_detections([], [], []), _detections([], [], [])]
    result = evaluate_coco(dataset.records, nothing, dataset.label_map)
    assert result.stats["AP"] == 0.0 and result.stats["AR100"] == 0.0  # ground truth, nothing found
    assert math.isnan(result.stats["AP_small"])  # no small ground truth
    no_images = evaluate_coco([], [], dataset.label_map)
    assert all(math.isnan(v) for v in no_images.stats.values())
    assert all(math.isnan(v) for v in no_images.per_class_ap.values())
    stray = [_detections([[1, 1, 20, 20]], [0.5], [0])]
    no_ground_truth = evaluate_coco([dataset.records[1]], stray, dataset.label_map)
    assert all(math.isnan(v) for v in no_ground_truth.stats.values())


def test_ignore_regions_and_difficult_boxes_absorb_detections(make_record):
    names = LabelMap(("car", "person"))
    # Cars: A found (0.8), B difficult and not found. Person P found (0.7). One car (0.95) and one
    # person (0.9) detection lie inside a DontCare region, ranked above the true positives.
    gt_boxes = [[10, 10, 60, 60], [200, 20, 250, 80], [10, 150, 40, 230]]
    detections = [_detections([[10, 10, 60, 60], [120, 120, 140, 150], [110, 105, 150, 155], [10, 150, 40, 230]],
                              [0.8, 0.95, 0.9, 0.7], [0, 0, 1, 1])]  # fmt: skip
    plain = make_record(0, gt_boxes, [0, 0, 1], width=300, height=300)
    marked = make_record(0, gt_boxes, [0, 0, 1], width=300, height=300,
                         difficult=[False, True, False], ignore_regions=[[100, 100, 160, 160]])  # fmt: skip
    baseline = evaluate_coco([plain], detections, names)
    ignored = evaluate_coco([marked], detections, names)
    # marked: the region absorbs detections of both classes, the difficult car is not missed
    assert ignored.per_class_ap == {"car": pytest.approx(1.0), "person": pytest.approx(1.0)}
    assert ignored.stats["AP"] == pytest.approx(1.0) and ignored.stats["AR100"] == pytest.approx(1.0)
    # plain: car -- FP then TP with 2 cars: precision 1/2 up to recall 1/2; person -- FP then TP
    assert baseline.stats["AR100"] == pytest.approx(0.75)
    assert baseline.per_class_ap["person"] == pytest.approx(0.5, abs=0.01)
    assert baseline.per_class_ap["car"] == pytest.approx(0.5 * 51 / 101, abs=0.01)


def test_pr_curve_at_iou_half(make_record):
    record = make_record(0, [[0, 0, 50, 50], [100, 100, 150, 150]], [0, 0])
    # FP first, then both TPs: precision envelope 2/3 up to recall 1
    result = evaluate_coco([record], [_detections([[60, 0, 90, 30], [0, 0, 50, 50], [100, 100, 150, 150]],
                                                  [0.9, 0.8, 0.7], [0, 0, 0])], LabelMap(("car",)))  # fmt: skip
    recall, precision = result.pr_curve(0, iou=0.5)
    assert recall.shape == precision.shape == (101,)
    np.testing.assert_allclose(precision, 2 / 3, rtol=1e-12)
    with pytest.raises(ValueError, match="thresholds"):
        result.pr_curve(0, iou=0.42)
