"""Losses of the training aids: grouped matching, the denoising loss on a hand-checked case, the
denoising copies' noise, the one-to-many branch, and exact gradient accumulation with every aid on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, box_iou

from detr.models.criterion import SetCriterion, loss_weights
from detr.models.denoising import DenoisingQueries
from detr.models.matcher import HungarianMatcher
from tests.models import aids_cases
from tests.models.conftest import random_targets


@pytest.mark.parametrize("class_cost", ["softmax", "focal"])
def test_grouped_matching_equals_matching_each_group_alone(class_cost):
    groups, q, k = 3, 5, 4
    g = torch.Generator().manual_seed(0)
    targets = random_targets([3, 0, 5, 1], k, seed=1)  # 5 targets > Q: some stay unmatched in a group
    outputs = {"pred_logits": torch.randn(4, groups * q, k + 1, generator=g),
               "pred_boxes": torch.rand(4, groups * q, 4, generator=g) * 0.5 + 0.25, "query_groups": groups}
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, class_cost=class_cost)
    grouped = matcher(outputs, targets)
    cost = matcher.cost_matrix(outputs, targets).numpy()  # [B, K Q, T]
    start = 0
    for i, target in enumerate(targets):
        n = len(target["labels"])
        expected = set()
        for group in range(groups):
            # Reference: scipy on this group's own block of the cost matrix, alone.
            rows, cols = linear_sum_assignment(cost[i, group * q : (group + 1) * q, start : start + n])
            expected |= {(int(r) + group * q, int(c)) for r, c in zip(rows, cols)}
        got = set(zip(grouped[i][0].tolist(), grouped[i][1].tolist()))
        assert got == expected
        assert len(got) == groups * min(n, q)
        start += n


def test_denoising_loss_on_a_hand_checked_case():
    """Two images, one denoising group with negatives: image 0 has 2 targets, image 1 has 1 (so
    one positive and one negative slot of image 1 are padding and take no loss)."""
    num_classes, eos = 2, 0.1
    criterion = SetCriterion(num_classes, HungarianMatcher(), loss_weights(1, 1, 1, num_aux_layers=0, two_stage=False,
                                                                         denoising=True), eos_coef=eos)
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.4, 0.4, 0.2]])},
    ]
    # Slots per image: [positive 0, positive 1, negative 0, negative 1].
    logits = torch.tensor([
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
        [[0.0, 0.5, 0.0], [9.0, 9.0, 9.0], [1.0, 0.0, 2.0], [9.0, 9.0, 9.0]],
    ])
    boxes = torch.tensor([
        [[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]],
        [[0.6, 0.4, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]],
    ])
    dn = {"pred_logits": logits, "pred_boxes": boxes, "groups": 1, "copies": 2,
          "valid": torch.tensor([[True, True, True, True], [True, False, True, False]]),
          "target_index": torch.tensor([[0, 1, -1, -1], [0, -1, -1, -1]])}
    losses = criterion._denoising_losses(dn, targets, torch.tensor(3.0), None)

    def nll(row, label):
        return -math.log(math.exp(row[label]) / sum(math.exp(v) for v in row))

    # Positives: their class (weight 1); negatives: "no object" (class 2, weight eos); 3 boxes.
    class_sum = (nll([2, 0, 0], 0) + nll([0, 1, 0], 1) + nll([0, 0.5, 0], 1)
                 + eos * (nll([0, 0, 3], 2) + nll([1, 1, 1], 2) + nll([1, 0, 2], 2)))
    assert float(losses["loss_ce_dn"]) == pytest.approx(class_sum / (3 + 3 * eos), rel=1e-6)
    # L1: exact, off by 0.1 in y (target 1), off by 0.2 in w (image 1); divided by 3 boxes.
    assert float(losses["loss_bbox_dn"]) == pytest.approx((0.1 + 0.2) / 3, rel=1e-6)
    # GIoU: box 1 [0.2,0.1,0.4,0.5] vs [0.2,0.2,0.4,0.6]: IoU 0.06/0.1 = 0.6, hull = union -> 1 - 0.6.
    # Image 1: [0.5,0.3,0.7,0.5] inside [0.4,0.3,0.8,0.5]: IoU 0.04/0.08 = 0.5, hull = union -> 0.5.
    assert float(losses["loss_giou_dn"]) == pytest.approx((0.0 + 0.4 + 0.5) / 3, rel=1e-5)


def test_denoising_focal_loss_counts_valid_copies_only():
    num_classes, alpha, gamma = 2, 0.25, 2.0
    criterion = SetCriterion(num_classes, HungarianMatcher(class_cost="focal"),
                             loss_weights(1, 1, 1, num_aux_layers=0, two_stage=False, denoising=True),
                             class_loss="focal", focal_alpha=alpha, focal_gamma=gamma)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits = torch.tensor([[[0.3, -0.2], [1.5, 0.5], [7.0, 7.0]]])  # positive, negative, padding
    dn = {"pred_logits": logits, "pred_boxes": torch.full((1, 3, 4), 0.5), "groups": 2, "copies": 2,
          "valid": torch.tensor([[True, True, False]]), "target_index": torch.tensor([[0, -1, -1]])}
    losses = criterion._denoising_losses(dn, targets, torch.tensor(1.0), None)

    def focal(x, positive):
        p = 1 / (1 + math.exp(-x))
        if positive:
            return -alpha * (1 - p) ** gamma * math.log(p)
        return -(1 - alpha) * p**gamma * math.log(1 - p)

    expected = focal(0.3, False) + focal(-0.2, True) + focal(1.5, False) + focal(0.5, False)
    # Normalized by groups x boxes = 2.
    assert float(losses["loss_ce_dn"]) == pytest.approx(expected / 2, rel=1e-5)


def test_denoising_copies_layout_and_noise_bounds():
    targets = random_targets([3, 1], 4, seed=2)
    dn = DenoisingQueries(4, 8, groups=3, label_noise_ratio=0.0, box_noise_scale=0.5, contrastive=True)
    torch.manual_seed(0)
    batch = dn(targets)
    assert (batch.groups, batch.copies, batch.slots) == (3, 2, 6)
    assert batch.content.shape == (2, 18, 8) and batch.valid.sum(1).tolist() == [18, 6]
    for i, target in enumerate(targets):
        n = len(target["labels"])
        xyxy = box_convert(target["boxes"], "cxcywh", "xyxy")
        half = target["boxes"][:, 2:].repeat(1, 2) / 2
        for group in range(3):
            positives = slice(group * 6, group * 6 + n)
            negatives = slice(group * 6 + 3, group * 6 + 3 + n)
            assert batch.target_index[i, positives].tolist() == list(range(n))
            assert (batch.target_index[i, negatives] == -1).all()
            noised = box_convert(batch.boxes_unact[i].sigmoid(), "cxcywh", "xyxy")
            moved = (noised[positives] - xyxy).abs()
            assert (moved <= 0.5 * half + 1e-5).all()  # positives: within scale x half size
            # Negatives: every corner moved at least scale x half size, unless clipped at the border.
            far = (noised[negatives] - xyxy).abs() >= 0.5 * half - 1e-5
            clipped = (noised[negatives] <= 1e-5) | (noised[negatives] >= 1 - 1e-5)
            assert (far | clipped).all()
            # No label noise: the embeddings are those of the true labels.
            embedded = dn.label_embed(target["labels"])
            assert torch.equal(batch.content[i, positives], embedded)
    # Label noise 1: every label drawn at random (about 3 in 4 differ from the truth over 4 classes).
    noisy = DenoisingQueries(4, 8, groups=50, label_noise_ratio=1.0, box_noise_scale=0.0, contrastive=False)
    labels, boxes = noisy._noise(torch.zeros(4, dtype=torch.int64), torch.full((4, 4), 0.5), 1)
    assert 0.6 < float((labels != 0).float().mean()) < 0.9
    assert torch.allclose(boxes, torch.full_like(boxes, 0.5))  # box noise 0: the boxes themselves


def test_one_to_many_loss_is_the_set_loss_against_repeated_targets():
    criterion = aids_cases.criterion("detr")
    model = aids_cases.model("detr").train()
    targets = random_targets([2, 1], aids_cases.NUM_CLASSES, seed=3)
    with torch.no_grad():
        out = model(aids_cases.images())
    losses = criterion(out, targets)
    o2m = out["one_to_many"]
    assert o2m["pred_logits"].shape[1] == 4 and o2m["repeats"] == 2
    # Reference: a plain criterion with o2m's outputs as its predictions and each target twice.
    plain = SetCriterion(aids_cases.NUM_CLASSES, criterion.matcher,
                         loss_weights(1, 5, 2, num_aux_layers=1, two_stage=False))
    twice = [{"labels": t["labels"].repeat(2), "boxes": t["boxes"].repeat(2, 1)} for t in targets]
    expected = plain({k: v for k, v in o2m.items() if k != "repeats"}, twice)
    pairs = [("loss_ce_o2m", "loss_ce"), ("loss_bbox_o2m", "loss_bbox"), ("loss_giou_o2m", "loss_giou"),
             ("loss_ce_o2m_0", "loss_ce_0"), ("loss_giou_o2m_0", "loss_giou_0")]
    for ours, reference in pairs:
        assert float(losses[ours]) == pytest.approx(float(expected[reference]), rel=1e-6), ours
    assert criterion.weight_dict["loss_bbox_o2m"] == 5.0  # loss weight 1 x the box coefficient


def test_query_groups_loss_is_the_mean_over_groups():
    criterion = aids_cases.criterion("detr")
    model = aids_cases.model("detr").train()
    targets = random_targets([2, 3], aids_cases.NUM_CLASSES, seed=4)
    with torch.no_grad():
        out = model(aids_cases.images())
    losses = criterion(out, targets)
    q = model.num_queries
    plain = SetCriterion(aids_cases.NUM_CLASSES, criterion.matcher,
                         loss_weights(1, 5, 2, num_aux_layers=0, two_stage=False))
    per_group = [plain({"pred_logits": out["pred_logits"][:, g * q : (g + 1) * q],
                        "pred_boxes": out["pred_boxes"][:, g * q : (g + 1) * q]}, targets) for g in range(3)]
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        mean = float(np.mean([float(p[name]) for p in per_group]))
        assert float(losses[name]) == pytest.approx(mean, rel=1e-5), name
    # The logged errors are group 0's, the predictions inference makes.
    assert float(losses["cardinality_error"]) == pytest.approx(float(per_group[0]["cardinality_error"]))


@pytest.mark.parametrize("case", ["detr", "detr_two_stage", "deformable_two_stage"])
def test_gradient_accumulation_is_exact_with_the_aids(case):
    """Two micro-batches with their share of the step's loss give the gradient of the whole batch
    (micro-batches with different box counts: different padding, different normalizers)."""
    targets = random_targets([3, 1, 0, 2], aids_cases.NUM_CLASSES, seed=6)
    x = aids_cases.images(batch=4, seed=2)
    criterion = aids_cases.criterion(case)

    def gradients(splits):
        model = aids_cases.model(case, seed=3).train()
        torch.manual_seed(11)  # the denoising noise: drawn image by image, so the same in both runs
        step = None if len(splits) == 1 else targets
        for part in splits:
            out = model(x[part], None, [targets[i] for i in range(4)[part]])
            criterion(out, [targets[i] for i in range(4)[part]], step_targets=step)["weighted_total"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole = gradients([slice(0, 4)])
    accumulated = gradients([slice(0, 2), slice(2, 4)])
    assert whole.keys() == accumulated.keys()
    assert any(n.startswith("training_aids.") for n in whole)
    scale = max(float(g.abs().max()) for g in whole.values())
    gap = max(float((whole[n] - accumulated[n]).abs().max()) for n in whole)
    assert gap <= 1e-5 * scale, (gap, scale)


def test_a_batch_without_targets_still_uses_every_parameter():
    """DistributedDataParallel (find_unused_parameters=False) needs a gradient for every parameter
    in every step, also when no image of a process's batch has a box (no denoising queries)."""
    model = aids_cases.model("detr_two_stage").train()
    criterion = aids_cases.criterion("detr_two_stage")
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = model(aids_cases.images(), None, empty)
    criterion(out, empty)["weighted_total"].backward()
    label_embed = model.training_aids.denoising.label_embed.weight
    assert label_embed.grad is not None and float(label_embed.grad.abs().max()) == 0.0


def test_the_hand_checked_ious():
    """The GIoU numbers of the hand-checked case, from torchvision (independent of the criterion)."""
    a = box_convert(torch.tensor([[0.3, 0.4, 0.2, 0.4], [0.6, 0.4, 0.2, 0.2]]), "cxcywh", "xyxy")
    b = box_convert(torch.tensor([[0.3, 0.3, 0.2, 0.4], [0.6, 0.4, 0.4, 0.2]]), "cxcywh", "xyxy")
    assert torch.allclose(box_iou(a, b).diagonal(), torch.tensor([0.6, 0.5]), atol=1e-6)
