"""The confusion matrix: hand-computed cases and pycocotools' matching as the reference for the diagonal."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from detr.engine.coco_eval import detections_array, ground_truth_dict, load_detections, load_ground_truth
from detr.engine.confusion import confusion_matrix
from detr.engine.detections import detections_from_prediction
from detr.engine.voc_eval import evaluate_voc


def _aligned(dataset, predictions):
    k = len(dataset.label_map)
    by_id = {p["image_id"]: detections_from_prediction(p, k, "test") for p in predictions}
    return list(dataset.records), [by_id[r.image_id] for r in dataset.records]


def _prediction(image_id, boxes, scores, labels):
    return {"image_id": image_id, "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
            "scores": np.asarray(scores, np.float64), "labels": np.asarray(labels, np.int64)}


def test_hand_computed_matrix(make_record, make_dataset):
    # Classes a=0, b=1, c=2. Image 1: objects a [0,0,100,100], b [200,0,300,100], c [0,200,100,300].
    #   a 0.9 on a -> correct; a 0.8 on a again -> spurious (duplicate); c 0.7 on b -> b confused as c;
    #   nothing on c -> c missed; b 0.3 on c -> below the threshold, not counted.
    # Image 2: difficult a at [0,0,100,100], crowd b at [200,200,400,400], ignore region [300,0,400,100];
    #   b 0.9 on the difficult box, a 0.8 inside the crowd box, a 0.7 inside the region -> excused;
    #   a 0.6 at [150, 0, 200, 50] -> spurious.
    records = [
        make_record(1, [[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300]], [0, 1, 2], width=400, height=400),
        make_record(2, [[0, 0, 100, 100], [200, 200, 400, 400]], [0, 1], difficult=[True, False],
                    iscrowd=[False, True], ignore_regions=[[300, 0, 400, 100]], width=400, height=400),
    ]
    dataset = make_dataset(records, ["a", "b", "c"])
    predictions = [
        _prediction(1, [[0, 0, 100, 100], [2, 2, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300]],
                    [0.9, 0.8, 0.7, 0.3], [0, 0, 2, 1]),
        _prediction(2, [[0, 0, 100, 100], [250, 250, 300, 300], [320, 20, 380, 80], [150, 0, 200, 50]],
                    [0.9, 0.8, 0.7, 0.6], [1, 0, 0, 0]),
    ]
    matrix, matches = confusion_matrix(*_aligned(dataset, predictions), ["a", "b", "c"], score_threshold=0.5)
    expected = np.array([
        # a  b  c  background(missed)
        [1, 0, 0, 0],  # a
        [0, 0, 1, 0],  # b
        [0, 0, 0, 1],  # c
        [2, 0, 0, 0],  # background (spurious)
    ])
    np.testing.assert_array_equal(matrix.counts, expected)
    assert matrix.ignored == 3
    assert matrix.most_confused(1) == ("c", 1) and matrix.most_confused(0) is None
    assert matrix.recall(0) == 1.0 and matrix.precision(0) == pytest.approx(1 / 3)
    assert matrix.totals() == {"objects": 3, "detections": 4, "correct": 1, "confused": 1, "missed": 1,
                               "spurious": 2, "ignored": 3}
    normalized = matrix.normalized()
    np.testing.assert_allclose(normalized.sum(axis=1), [1, 1, 1, 1])
    assert matches[0].f1() == pytest.approx(2 / (2 + 2 + 1 + 1))  # 1 TP, confused = FP + FN, 1 dupe, 1 missed
    saved = matrix.to_dict()
    assert saved["labels"] == ["a", "b", "c", "background"] and saved["counts"] == expected.tolist()
    assert matrix.figure().axes  # renders


def test_lower_threshold_admits_more_detections(make_record, make_dataset):
    dataset = make_dataset([make_record(1, [[0, 0, 50, 50]], [0])], ["a"])
    predictions = [_prediction(1, [[0, 0, 50, 50]], [0.3], [0])]
    high, _ = confusion_matrix(*_aligned(dataset, predictions), ["a"], score_threshold=0.5)
    low, _ = confusion_matrix(*_aligned(dataset, predictions), ["a"], score_threshold=0.3)
    assert high.counts.tolist() == [[0, 1], [0, 0]] and low.counts.tolist() == [[1, 0], [0, 0]]


def _coco_true_positives(records, detections, label_map, score_threshold):
    """Per class, detections scoring >= the threshold that COCOeval matches at IoU 0.5."""
    image_ids = list(range(1, len(records) + 1))
    kept = [type(d)(d.boxes[d.scores >= score_threshold], d.scores[d.scores >= score_threshold],
                    d.labels[d.scores >= score_threshold]) for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = load_ground_truth(ground_truth_dict(records, label_map, image_ids))
        dt = load_detections(gt, detections_array(kept, image_ids))
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.iouThrs = np.array([0.5])
        evaluator.params.areaRng = [[0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
    counts = np.zeros(len(label_map), np.int64)
    for e in evaluator.evalImgs:
        if e is not None:
            counts[e["category_id"] - 1] += int(((e["dtMatches"][0] > 0) & ~e["dtIgnore"][0]).sum())
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagonal_is_cocoeval_true_positives_and_rows_count_voc_objects(random_problem, seed):
    dataset, predictions = random_problem(seed, num_images=30, num_classes=4, special=False)
    records, detections = _aligned(dataset, predictions)
    matrix, _ = confusion_matrix(records, detections, dataset.label_map.names, score_threshold=0.4)
    k = len(dataset.label_map)
    np.testing.assert_array_equal(np.diag(matrix.counts)[:k],
                                  _coco_true_positives(records, detections, dataset.label_map, 0.4))
    voc = evaluate_voc(records, detections, dataset.label_map)
    np.testing.assert_array_equal(matrix.counts[:k].sum(axis=1), [c.num_ground_truth for c in voc.classes])
    kept = sum(int((d.scores >= 0.4).sum()) for d in detections)
    assert matrix.counts[:, :k].sum() + matrix.ignored == kept
    assert matrix.counts[:k, :k].sum() > np.trace(matrix.counts)  # the problem has confusions
