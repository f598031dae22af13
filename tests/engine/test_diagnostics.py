"""Diagnostics of an evaluation: batch-size invariance, per-class numbers, worst images, captions, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detr.engine.drawing import add_caption, display_scale
from detr.engine.evaluation import Evaluator


def _report(dataset, predictions, batch_size, threshold=0.5, draw=False):
    evaluator = Evaluator(dataset)
    for start in range(0, len(predictions), batch_size):
        evaluator.update(predictions[start : start + batch_size])
    evaluator.gather()
    evaluator.compute()
    return evaluator.report(threshold, draw=draw)


def test_diagnostics_do_not_depend_on_batch_size_or_order(random_problem):
    dataset, predictions = random_problem(0, num_images=24, num_classes=3)
    by_one = _report(dataset, predictions, 1)
    order = np.random.default_rng(1).permutation(len(predictions))
    shuffled = _report(dataset, [predictions[i] for i in order], 5)
    a, b = by_one.metrics(), shuffled.metrics()
    assert list(a) == list(b)
    np.testing.assert_array_equal(np.array(list(a.values())), np.array(list(b.values())))
    assert by_one.diagnostics.worst == shuffled.diagnostics.worst
    np.testing.assert_array_equal(by_one.diagnostics.confusion.counts, shuffled.diagnostics.confusion.counts)
    assert {"tide/AP50", "tide/dAP/miss", "confusion/recall", "confusion/recall/class1"} <= set(a)


def test_per_class_numbers_come_from_coco_and_the_confusion_matrix(random_problem):
    dataset, predictions = random_problem(1, num_images=20, num_classes=3, special=False)
    evaluator = Evaluator(dataset)
    evaluator.update(predictions)
    result = evaluator.compute_results()
    diagnostics = evaluator.report(0.4, draw=False).diagnostics
    for k, row in enumerate(diagnostics.classes):
        assert row.ap == result.coco.per_class_ap[row.name]
        assert row.ap50 == pytest.approx(result.coco.pr_curve(k, 0.5)[1].mean())
        assert row.recall == diagnostics.confusion.recall(k)
        assert row.objects == result.voc.classes[k].num_ground_truth
    # The mean of the per-class AP50 is COCO's AP50.
    assert np.mean([c.ap50 for c in diagnostics.classes]) == pytest.approx(result.metrics["coco/AP50"])


def test_worst_images_are_ranked_by_f1_and_say_what_went_wrong(make_record, make_dataset):
    boxes = [[0, 0, 50, 50], [100, 100, 150, 150]]
    records = [make_record(i, boxes, [0, 1]) for i in (1, 2, 3, 4)]
    dataset = make_dataset(records, ["cat", "dog"])

    def pred(image_id, det_boxes, scores, labels):
        return {"image_id": image_id, "boxes": np.asarray(det_boxes, float).reshape(-1, 4),
                "scores": np.asarray(scores, float), "labels": np.asarray(labels, np.int64)}

    predictions = [
        pred(1, boxes, [0.9, 0.9], [0, 1]),  # perfect: F1 1, never "worst"
        pred(2, boxes[:1], [0.9], [0]),  # dog missed: F1 2/3
        pred(3, boxes, [0.9, 0.8], [0, 0]),  # dog predicted as cat: F1 2/4
        pred(4, boxes, [0.3, 0.2], [0, 1]),  # nothing passes 0.5: F1 0
    ]
    diagnostics = _report(dataset, predictions, 2).diagnostics
    assert [w.image_id for w in diagnostics.worst] == [4, 3, 2]
    assert [w.f1 for w in diagnostics.worst] == pytest.approx([0.0, 0.5, 2 / 3])
    assert diagnostics.worst[0].problems == ("2 missed (cat, dog); no detection passes the threshold "
                                             "(best: cat 0.30)")
    assert diagnostics.worst[1].problems == "1 confused (dog as cat)"
    assert diagnostics.worst[2].problems == "1 missed (dog)"
    summary = diagnostics.summary()
    assert "score >= 0.50" in summary and "dog predicted as cat (1x)" in summary
    assert "found 4 of 8 objects" in summary and "worst images: 4 (F1 0.00" in summary


def test_nothing_above_the_threshold_is_said_in_the_summary(make_record, make_dataset):
    dataset = make_dataset([make_record(1, [[0, 0, 50, 50]], [0])], ["cat"])
    prediction = {"image_id": 1, "boxes": np.array([[0.0, 0, 50, 50]]), "scores": np.array([0.2]),
                  "labels": np.array([0])}
    diagnostics = _report(dataset, [prediction], 1).diagnostics
    assert "no detection scores 0.50 or more" in diagnostics.summary()
    assert diagnostics.tide.ap == pytest.approx(1.0)  # the ranking is perfect; only the threshold hides it


def test_drawn_worst_images_and_saved_report(tmp_path, make_dataset):
    from detr.data.records import ImageRecord

    # A real image file: the report reads pixels to draw.
    path = tmp_path / "img.png"
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(path)
    record = ImageRecord(image_path=path, width=160, height=120, boxes=np.array([[10, 10, 60, 60]], np.float32),
                         labels=np.array([0]), box_sources=("t",), source="t", image_id=7)
    dataset = make_dataset([record], ["cat", "dog"])
    prediction = {"image_id": 7, "boxes": np.array([[10.0, 10, 60, 60], [100, 60, 150, 110]]),
                  "scores": np.array([0.9, 0.8]), "labels": np.array([1, 1])}
    report = _report(dataset, [prediction], 1, draw=True)
    ((name, image),) = report.worst_images
    assert name == "worst_01_image_7.png"
    scale = display_scale(160, 120)
    assert scale == 2.0 and image.shape[1] == 320 and image.shape[0] > 240  # enlarged, plus a caption band
    band = image[240:]
    assert (band != band[0, 0]).any(axis=-1).sum() > 50  # text was written in the band
    written = {p.relative_to(tmp_path / "report").as_posix() for p in
               __import__("detr.engine.diagnostics", fromlist=["save_report"]).save_report(report, tmp_path / "report")}
    assert {"confusion_matrix.png", "tide_errors.png", "confusion_matrix.json", "diagnostics.json", "per_class.json",
            "worst_images.json", "summary.txt", "worst_images/worst_01_image_7.png"} == written
    saved = json.loads((tmp_path / "report" / "confusion_matrix.json").read_text())
    assert saved["counts"] == [[0, 1, 0], [0, 0, 0], [0, 1, 0]]  # cat seen as dog; one dog on no object


def test_caption_wraps_to_the_image_width():
    image = np.zeros((40, 100, 3), np.uint8)
    one = add_caption(image, ["short"])
    many = add_caption(image, ["a caption much longer than one hundred pixels of width can hold on one line"])
    assert one.shape[1] == many.shape[1] == 100 and many.shape[0] > one.shape[0] > 40


def test_drawn_predictions_say_when_none_passes_the_threshold(make_record, make_dataset):
    import torch

    from detr.config import load_config
    from detr.engine.overlays import OverlayRenderer

    dataset = make_dataset([make_record(1, [[0, 0, 50, 50]], [0])], ["cat", "dog"])
    renderer = OverlayRenderer(trainer=None, dataset=dataset, transforms=load_config(None).data.transforms,
                               num_images=1)
    assert renderer.score_threshold == 0.5  # the serving default
    weak = {"scores": torch.tensor([0.21, 0.05]), "label_ids": torch.tensor([1, 0])}
    assert renderer.caption(weak, shown=0) == [
        "no prediction has score >= 0.50 (best: dog 0.21); white: ground truth only"]
    assert renderer.caption({"scores": torch.zeros(0), "label_ids": torch.zeros(0)}, shown=0) == [
        "no predictions at all; white: ground truth only"]
    assert renderer.caption(weak, shown=2) == ["2 predictions with score >= 0.50 (class colours); white: ground truth"]
