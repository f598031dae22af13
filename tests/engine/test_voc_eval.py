"""VOC AP on tiny cases whose AP is computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detr.data.labelmap import LabelMap
from detr.engine.detections import ImageDetections
from detr.engine.voc_eval import average_precision, average_precision_11pt, evaluate_voc, match_image

ONE_CLASS = LabelMap(("a",))


def dets(boxes, scores, labels=None) -> ImageDetections:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.zeros(len(boxes), np.int64) if labels is None else np.asarray(labels, np.int64)
    return ImageDetections(boxes, np.asarray(scores, np.float64), labels)


def shifted(box, dx):
    x1, y1, x2, y2 = box
    return [x1 + dx, y1, x2 + dx, y2]


A = [0, 0, 20, 20]
B = [50, 50, 90, 80]
C = [100, 10, 130, 60]


def only_class(records, detections, label_map=ONE_CLASS):
    result = evaluate_voc(records, detections, label_map)
    return result.classes[0]


def test_perfect_detector_has_ap_one(make_record):
    records = [make_record(0, [A, B], [0, 0]), make_record(1, [C], [0])]
    c = only_class(records, [dets([A, B], [0.9, 0.8]), dets([C], [0.7])])
    assert (c.ap, c.ap_11pt) == (1.0, 1.0)
    np.testing.assert_array_equal(c.recall, [1 / 3, 2 / 3, 1.0])
    np.testing.assert_array_equal(c.precision, [1.0, 1.0, 1.0])


def test_false_positive_ranked_above_the_true_positive(make_record):
    # 1 GT; FP (0.9), TP (0.8): recall [0, 1], precision [0, 1/2].
    # All-point: envelope is 1/2 over recall (0, 1] -> 0.5. 11-point: max precision at recall >= t
    # is 1/2 for every t -> 0.5.
    c = only_class([make_record(0, [A], [0])], [dets([B, A], [0.9, 0.8])])
    assert c.ap == pytest.approx(0.5) and c.ap_11pt == pytest.approx(0.5)


def test_missed_ground_truth(make_record):
    # 2 GT, one TP: recall [1/2], precision [1].
    # All-point: 1/2 * 1 = 0.5. 11-point: t = 0, 0.1, ..., 0.5 reach precision 1 (6 of 11) -> 6/11.
    c = only_class([make_record(0, [A, B], [0, 0])], [dets([A], [0.9])])
    assert c.ap == pytest.approx(0.5)
    assert c.ap_11pt == pytest.approx(6 / 11)


def test_detections_on_difficult_boxes_are_neither_tp_nor_fp(make_record):
    # B is difficult: the two detections on it (0.95, 0.9) are ignored -- the second is not a
    # duplicate FP -- and B is not a miss. Only A counts: one TP -> AP 1.
    record = make_record(0, [A, B], [0, 0], difficult=[False, True])
    c = only_class([record], [dets([B, B, A], [0.95, 0.9, 0.8])])
    assert (c.ap, c.ap_11pt) == (1.0, 1.0)
    assert c.num_ground_truth == 1 and c.num_ignored == 2
    # Without the flag the same detections give: TP, FP (duplicate), TP over 2 GT -> AP < 1.
    plain = only_class([make_record(0, [A, B], [0, 0])], [dets([B, B, A], [0.95, 0.9, 0.8])])
    assert plain.ap < 1.0


def test_duplicates_count_as_false_positives_and_11pt_differs_from_all_point(make_record):
    # 2 GT. Detections: A (0.9) TP, A again (0.8) FP, B (0.7) TP.
    # recall [1/2, 1/2, 1], precision [1, 1/2, 2/3].
    # All-point: envelope 1 on (0, 1/2], 2/3 on (1/2, 1] -> 1/2 + 1/3 = 5/6.
    # 11-point: t <= 0.5 (6 thresholds) -> 1; t >= 0.6 (5 thresholds) -> 2/3; (6 + 10/3) / 11 = 28/33.
    c = only_class([make_record(0, [A, B], [0, 0])], [dets([A, A, B], [0.9, 0.8, 0.7])])
    np.testing.assert_allclose(c.precision, [1, 1 / 2, 2 / 3])
    assert c.ap == pytest.approx(5 / 6)
    assert c.ap_11pt == pytest.approx(28 / 33)


def test_eleven_point_and_all_point_on_a_crafted_ranking():
    # 3 GT; ranking TP FP TP FP TP:
    # recall    [1/3, 1/3, 2/3, 2/3, 1  ]
    # precision [1,   1/2, 2/3, 1/2, 3/5]
    # envelope  [1,   2/3, 2/3, 3/5, 3/5]
    # All-point: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 1/3 + 2/9 + 1/5 = 34/45.
    # 11-point: t in {0, .1, .2, .3} -> 1; t in {.4, .5, .6} -> 2/3; t in {.7, .8, .9, 1} -> 3/5;
    #           (4 + 2 + 12/5) / 11 = 42/55.
    recall = np.array([1, 1, 2, 2, 3]) / 3
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    assert average_precision(recall, precision) == pytest.approx(34 / 45, abs=1e-15)
    assert average_precision_11pt(recall, precision) == pytest.approx(42 / 55, abs=1e-15)


def test_eleven_point_thresholds_reach_an_exact_recall_of_three_tenths(make_record):
    # 10 GT, the first 3 found and nothing else: recall [.1, .2, .3], precision 1.
    # 11-point: t in {0, .1, .2, .3} -> 1 -> 4/11 (3 * 0.1 = 0.30000000000000004 would give 3/11).
    # All-point: 0.3.
    boxes = [[i * 30, 0, i * 30 + 20, 20] for i in range(10)]
    c = only_class([make_record(0, boxes, [0] * 10, width=400)], [dets(boxes[:3], [0.9, 0.8, 0.7])])
    assert c.ap_11pt == pytest.approx(4 / 11)
    assert c.ap == pytest.approx(0.3)


def test_iou_uses_continuous_coordinates_and_an_inclusive_threshold():
    def match(det_box):
        gt = np.array([[0.0, 0.0, 10.0, 10.0]])
        one, none = np.zeros(1, np.int64), np.zeros(0, np.int64)
        return match_image(np.array([det_box]), one, gt, one, np.zeros(1, bool), np.zeros((0, 4)), none, 0.5)

    # IoU 100 / 200 = 0.5 exactly: a match (>=, as the devkit).
    tp, _ = match([0.0, 0.0, 10.0, 20.0])
    assert tp.tolist() == [True]
    # IoU 100 / 210 < 0.5; with the devkit's +1 pixels it would be 121 / 242 = 0.5, a match.
    tp, ignored = match([0.0, 0.0, 10.0, 21.0])
    assert tp.tolist() == [False] and ignored.tolist() == [False]


def test_best_overlap_already_taken_is_a_false_positive_even_if_another_gt_is_free():
    # d1 overlaps G1 and G2 with IoU 0.6 each and takes G1 (first maximum). d2's best is G1
    # (IoU 2/3) although G2 is free at IoU 0.54: the devkit counts d2 as a duplicate.
    gts = np.array([[0.0, 0, 20, 20], [10.0, 0, 30, 20]])
    detections = np.array([[5.0, 0, 25, 20], [4.0, 0, 24, 20]])
    zeros = np.zeros(2, np.int64)
    tp, ignored = match_image(detections, zeros, gts, zeros, np.zeros(2, bool), np.zeros((0, 4)), zeros[:0], 0.5)
    assert tp.tolist() == [True, False] and ignored.tolist() == [False, False]


def test_ignore_regions_and_crowd_boxes(make_record):
    # DontCare region R; crowd box K of the class. Detections: inside R (0.95), inside K (0.9),
    # half outside R (intersection / own area = 0.4 -> FP, 0.85), on A (0.8, TP).
    # Counted: FP, TP over 1 GT -> AP 0.5; the crowd box is not a GT to find.
    region = [100, 100, 160, 160]
    crowd = [0, 100, 60, 160]
    record = make_record(0, [A, crowd], [0, 0], iscrowd=[False, True], ignore_regions=[region])
    detections = dets([[110, 110, 150, 150], [10, 110, 50, 150], [144, 110, 184, 150], A], [0.95, 0.9, 0.85, 0.8])
    c = only_class([record], [detections])
    assert c.num_ground_truth == 1 and c.num_ignored == 2
    np.testing.assert_array_equal(c.recall, [0.0, 1.0])
    assert c.ap == pytest.approx(0.5)


def test_classes_without_ground_truth_are_nan_and_left_out_of_the_mean(make_record):
    label_map = LabelMap(("a", "b", "c"))
    record = make_record(0, [A, B], [0, 2])
    # class a: found; class b: no GT, one detection; class c: GT, not found.
    result = evaluate_voc([record], [dets([A, C], [0.9, 0.8], labels=[0, 1])], label_map)
    by_name = {c.name: c for c in result.classes}
    assert by_name["a"].ap == 1.0 and by_name["c"].ap == 0.0
    assert math.isnan(by_name["b"].ap) and math.isnan(by_name["b"].ap_11pt)
    assert result.map == pytest.approx(0.5) and result.map_11pt == pytest.approx(0.5)
    metrics = result.metrics()
    assert list(metrics)[:2] == ["voc/mAP50", "voc/mAP50_11pt"]
    assert metrics["voc/AP50/a"] == 1.0 and metrics["voc/AP50_11pt/c"] == 0.0
    assert math.isnan(metrics["voc/AP50/b"])


def test_no_detections_no_images(make_record):
    c = only_class([make_record(0, [A], [0]), make_record(1, [], [])], [dets([], []), dets([], [])])
    assert (c.ap, c.ap_11pt) == (0.0, 0.0)
    empty = evaluate_voc([], [], ONE_CLASS)
    assert math.isnan(empty.map) and math.isnan(empty.map_11pt)


def test_score_ties_rank_the_earlier_image_first(make_record):
    # Equal scores: image 0's FP is ranked before image 1's TP -> precision [0, 1/2] -> AP 0.5;
    # with the images swapped the TP comes first -> AP 1. Deterministic either way.
    records = [make_record(0, [], []), make_record(1, [A], [0])]
    detections = [dets([B], [0.5]), dets([A], [0.5])]
    assert only_class(records, detections).ap == pytest.approx(0.5)
    assert only_class(records[::-1], detections[::-1]).ap == pytest.approx(1.0)


def test_labels_keep_classes_apart(make_record):
    # A detection with the right box but the wrong class is a FP of that class, not a TP.
    label_map = LabelMap(("a", "b"))
    result = evaluate_voc([make_record(0, [A, B], [0, 1])], [dets([A, A], [0.9, 0.8], labels=[1, 0])], label_map)
    a, b = result.classes
    assert a.ap == 1.0
    assert b.ap == 0.0 and b.precision.tolist() == [0.0]
