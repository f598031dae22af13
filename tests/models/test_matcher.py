"""Hungarian matcher: batched == per image == brute force; empty targets; focal cost; one host copy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from detr.models.matcher import HungarianMatcher


def _outputs(batch: int, queries: int, logits_dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wh = 0.05 + 0.5 * torch.rand(batch, queries, 2, generator=g)
    centre = torch.rand(batch, queries, 2, generator=g)
    logits = torch.randn(batch, queries, logits_dim, generator=g)
    return {"pred_logits": logits, "pred_boxes": torch.cat([centre, wh], -1)}


def _giou(a: np.ndarray, b: np.ndarray) -> float:
    """GIoU of two cxcywh boxes, written out (independent of torchvision)."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def _focal_only(logit: float, alpha: float, gamma: float) -> float:
    """Focal cost of labelling a prediction positive minus negative (Deformable DETR)."""
    p = 1 / (1 + math.exp(-float(logit)))
    return alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)


def _pair_cost(logits, box, label, tgt_box, focal: bool, alpha=0.25, gamma=2.0, weights=(1.0, 5.0, 2.0)) -> float:
    if focal:
        cls = _focal_only(logits[label], alpha, gamma)
    else:
        e = np.exp(logits - logits.max())
        cls = -float(e[label] / e.sum())
    l1 = float(np.abs(box - tgt_box).sum())
    return weights[0] * cls + weights[1] * l1 - weights[2] * _giou(box, tgt_box)


def _brute_force(outputs, target, image: int, focal: bool) -> tuple[float, list[tuple[int, int]]]:
    """Minimum total cost over every injective map targets -> queries (itertools.permutations)."""
    logits = outputs["pred_logits"][image].double().numpy()
    boxes = outputs["pred_boxes"][image].double().numpy()
    labels, tgt_boxes = target["labels"].numpy(), target["boxes"].double().numpy()
    cost = [[_pair_cost(logits[q], boxes[q], labels[j], tgt_boxes[j], focal) for j in range(len(labels))]
            for q in range(len(boxes))]
    best = (math.inf, [])
    for queries in itertools.permutations(range(len(boxes)), len(labels)):
        total = sum(cost[q][j] for j, q in enumerate(queries))
        if total < best[0]:
            best = (total, sorted((q, j) for j, q in enumerate(queries)))
    return best


@pytest.mark.parametrize("focal", [False, True], ids=["softmax", "focal"])
def test_batched_equals_per_image_equals_brute_force(focal, make_targets):
    num_classes = 4
    matcher = HungarianMatcher(1.0, 5.0, 2.0, class_cost="focal" if focal else "softmax")
    for seed in range(3):
        outputs = _outputs(4, 5, num_classes if focal else num_classes + 1, seed)
        targets = make_targets([3, 0, 1, 5], num_classes, seed=seed)
        batched = matcher(outputs, targets)
        for i, target in enumerate(targets):
            single = matcher({k: v[i : i + 1] for k, v in outputs.items()}, [target])[0]
            assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
            rows, cols = batched[i]
            assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(target["labels"])
            if len(target["labels"]) == 0:
                continue
            _, expected = _brute_force(outputs, target, i, focal)
            assert sorted(zip(rows.tolist(), cols.tolist())) == expected


def test_no_targets_anywhere(make_targets):
    matcher = HungarianMatcher()
    outputs = _outputs(3, 6, 5, seed=0)
    indices = matcher(outputs, make_targets([0, 0, 0], 4))
    assert len(indices) == 3
    assert all(len(rows) == 0 and len(cols) == 0 for rows, cols in indices)


def test_more_targets_than_queries_matches_every_query(make_targets):
    matcher = HungarianMatcher()
    rows, cols = matcher(_outputs(1, 3, 5, seed=0), make_targets([5], 4))[0]
    assert sorted(rows.tolist()) == [0, 1, 2] and len(set(cols.tolist())) == 3


def test_focal_cost_uses_the_configured_alpha_and_gamma(make_targets):
    outputs = _outputs(1, 4, 3, seed=2)
    targets = make_targets([2], 3, seed=2)
    for alpha, gamma in [(0.25, 2.0), (0.5, 1.0), (0.9, 0.0)]:
        matcher = HungarianMatcher(1.0, 0.0, 0.0, class_cost="focal", focal_alpha=alpha, focal_gamma=gamma)
        cost = matcher.cost_matrix(outputs, targets)[0]
        logits = outputs["pred_logits"][0].double().numpy()
        for q in range(4):
            for j, label in enumerate(targets[0]["labels"].tolist()):
                expected = _focal_only(logits[q][label], alpha, gamma)
                assert cost[q, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_one_host_copy_per_call(monkeypatch, make_targets):
    calls = {"cpu": 0, "item": 0, "tolist": 0}
    for name in calls:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    matcher = HungarianMatcher()
    matcher(_outputs(4, 10, 6, seed=0), make_targets([3, 0, 7, 2], 5))
    assert calls == {"cpu": 1, "item": 0, "tolist": 0}


def test_non_finite_predictions_still_match(make_targets):
    outputs = _outputs(2, 4, 5, seed=0)
    outputs["pred_logits"][0, 1] = float("nan")
    outputs["pred_boxes"][1, 2] = float("inf")
    indices = HungarianMatcher()(outputs, make_targets([2, 3], 4))
    assert [len(r) for r, _ in indices] == [2, 3]
    assert all(len(set(r.tolist())) == len(r) for r, _ in indices)


def test_all_zero_costs_are_rejected():
    with pytest.raises(ValueError, match="all matcher costs are 0"):
        HungarianMatcher(0.0, 0.0, 0.0)
