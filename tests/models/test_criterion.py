"""Set criterion: each loss against a written-out computation, weights, auxiliary/encoder losses,
logged errors, empty targets and the cross-process box count."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr.models.build import build_criterion
from detr.models.criterion import SetCriterion, average_num_boxes, loss_weights
from detr.models.matcher import HungarianMatcher

K = 4


def _outputs(batch: int, queries: int, logits_dim: int, seed: int, aux: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def one():
        wh = 0.1 + 0.4 * torch.rand(batch, queries, 2, generator=g)
        boxes = torch.cat([0.2 + 0.6 * torch.rand(batch, queries, 2, generator=g), wh], -1)
        return {"pred_logits": torch.randn(batch, queries, logits_dim, generator=g).requires_grad_(),
                "pred_boxes": boxes.requires_grad_()}

    out = one()
    if aux:
        out["aux_outputs"] = [one() for _ in range(aux)]
    return out


def _xyxy(b):
    return [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]


def _giou(a, b) -> float:
    a, b = _xyxy(a), _xyxy(b)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _manual_losses(outputs, targets, indices, focal: bool, eos_coef=0.1, alpha=0.25, gamma=2.0) -> dict:
    """The three losses written out element by element from the matched indices."""
    logits = outputs["pred_logits"].detach().double()
    boxes = outputs["pred_boxes"].detach().double()
    b, q, _ = logits.shape
    num_boxes = max(1, sum(len(t["labels"]) for t in targets))
    assigned = {}
    for i, (rows, cols) in enumerate(indices):
        for r, c in zip(rows.tolist(), cols.tolist()):
            assigned[(i, r)] = c
    ce_num = ce_den = focal_sum = l1 = giou = 0.0
    for i in range(b):
        for r in range(q):
            label = int(targets[i]["labels"][assigned[(i, r)]]) if (i, r) in assigned else K
            if focal:
                for k in range(K):
                    p = 1 / (1 + math.exp(-float(logits[i, r, k])))
                    t = 1.0 if k == label else 0.0
                    p_t = p * t + (1 - p) * (1 - t)
                    alpha_t = alpha * t + (1 - alpha) * (1 - t)
                    focal_sum += alpha_t * (1 - p_t) ** gamma * -math.log(p_t)
            else:
                log_probs = torch.log_softmax(logits[i, r], -1)
                weight = eos_coef if label == K else 1.0
                ce_num += -weight * float(log_probs[label])
                ce_den += weight
            if (i, r) in assigned:
                tgt = targets[i]["boxes"][assigned[(i, r)]].double().tolist()
                pred = boxes[i, r].tolist()
                l1 += sum(abs(x - y) for x, y in zip(pred, tgt))
                giou += 1 - _giou(pred, tgt)
    return {
        "loss_ce": focal_sum / num_boxes if focal else ce_num / ce_den,
        "loss_bbox": l1 / num_boxes,
        "loss_giou": giou / num_boxes,
    }


def _criterion(focal: bool, num_aux_layers: int = 2, two_stage: bool = False, **kwargs) -> SetCriterion:
    matcher = HungarianMatcher(2.0 if focal else 1.0, 5.0, 2.0, class_cost="focal" if focal else "softmax")
    weights = loss_weights(2.0 if focal else 1.0, 5.0, 2.0, num_aux_layers=num_aux_layers, two_stage=two_stage)
    return SetCriterion(K, matcher, weights, class_loss="focal" if focal else "ce", **kwargs)


@pytest.mark.parametrize("focal", [False, True], ids=["ce", "focal"])
def test_losses_match_the_written_out_formulas(focal, make_targets):
    outputs = _outputs(3, 6, K if focal else K + 1, seed=0)
    targets = make_targets([2, 0, 4], K, seed=1)
    criterion = _criterion(focal)
    losses = criterion(outputs, targets)
    expected = _manual_losses(outputs, targets, criterion.matcher(outputs, targets), focal)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name


def test_focal_alpha_gamma_reach_the_loss(make_targets):
    outputs = _outputs(2, 5, K, seed=3)
    targets = make_targets([3, 1], K, seed=3)
    criterion = _criterion(True, focal_alpha=0.6, focal_gamma=1.0)
    losses = criterion(outputs, targets)
    expected = _manual_losses(outputs, targets, criterion.matcher(outputs, targets), True, alpha=0.6, gamma=1.0)
    assert losses["loss_ce"].item() == pytest.approx(expected["loss_ce"], rel=1e-5)


def test_eos_coef_weights_the_no_object_class(make_targets):
    outputs = _outputs(2, 6, K + 1, seed=4)
    targets = make_targets([1, 2], K, seed=4)
    criterion = _criterion(False, eos_coef=0.5)
    losses = criterion(outputs, targets)
    expected = _manual_losses(outputs, targets, criterion.matcher(outputs, targets), False, eos_coef=0.5)
    assert losses["loss_ce"].item() == pytest.approx(expected["loss_ce"], rel=1e-5)


def test_weighted_total_covers_aux_and_encoder_losses(make_targets):
    outputs = _outputs(2, 6, K, seed=5, aux=2)
    outputs["enc_outputs"] = _outputs(2, 20, K, seed=6)
    targets = make_targets([3, 2], K, seed=5)
    criterion = _criterion(True, num_aux_layers=2, two_stage=True)
    losses = criterion(outputs, targets)
    names = [n + s for s in ("", "_0", "_1", "_enc") for n in ("loss_ce", "loss_bbox", "loss_giou")]
    assert sorted(criterion.weight_dict) == sorted(names)
    assert sorted(k for k in losses if k.startswith("loss")) == sorted(names)
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    total = sum(losses[n + s].item() * weights[n] for n in weights for s in ("", "_0", "_1", "_enc"))
    assert losses["weighted_total"].item() == pytest.approx(total, rel=1e-6)
    # Each auxiliary layer is matched and scored like the final one.
    aux = _criterion(True)(outputs["aux_outputs"][1], targets)
    assert losses["loss_giou_1"].item() == pytest.approx(aux["loss_giou"].item(), rel=1e-6)


def test_terms_without_a_weight_are_an_error(make_targets):
    outputs = _outputs(2, 6, K + 1, seed=5, aux=3)
    with pytest.raises(ValueError, match=r"loss terms \['loss_bbox_2', 'loss_ce_2', 'loss_giou_2'\] have no weight"):
        _criterion(False, num_aux_layers=2)(outputs, make_targets([1, 1], K))


def test_encoder_loss_uses_class_agnostic_targets(make_targets):
    enc = _outputs(2, 20, K, seed=7)
    targets = make_targets([3, 2], K, seed=8)
    criterion = _criterion(True, two_stage=True)
    outputs = {**_outputs(2, 6, K, seed=9), "enc_outputs": enc}
    losses = criterion(outputs, targets)
    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    expected = _manual_losses(enc, binary, criterion.matcher(enc, binary), True)
    assert losses["loss_ce_enc"].item() == pytest.approx(expected["loss_ce"], rel=1e-5)
    assert losses["loss_bbox_enc"].item() == pytest.approx(expected["loss_bbox"], rel=1e-5)


def test_two_stage_detr_encoder_loss_keeps_the_classes(make_targets):
    """Two-stage DETR's encoder head learns the real classes (they pick its queries): the ``_enc``
    losses are the set losses of the encoder outputs against the targets as they are."""
    enc = _outputs(2, 20, K + 1, seed=7)
    targets = make_targets([3, 2], K, seed=8)
    criterion = _criterion(False, two_stage=True, class_agnostic_encoder=False)
    losses = criterion({**_outputs(2, 6, K + 1, seed=9), "enc_outputs": enc}, targets)
    expected = _manual_losses(enc, targets, criterion.matcher(enc, targets), False)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[name + "_enc"].item() == pytest.approx(expected[name], rel=1e-5)


def test_accumulated_shares_of_the_encoder_cross_entropy_add_up_to_the_whole_batch(make_targets):
    """Under gradient accumulation the cross-entropy is normalized by the step's class weights for
    each set's own number of predictions: 6 queries, but 20 encoder positions."""
    criterion = _criterion(False, num_aux_layers=0, two_stage=True, class_agnostic_encoder=False)
    outputs = {**_outputs(4, 6, K + 1, seed=1), "enc_outputs": _outputs(4, 20, K + 1, seed=2)}
    targets = make_targets([3, 1, 2, 4], K, seed=3)
    whole = criterion(outputs, targets)

    def half(part: slice) -> dict:
        return {"pred_logits": outputs["pred_logits"][part], "pred_boxes": outputs["pred_boxes"][part],
                "enc_outputs": {k: v[part] for k, v in outputs["enc_outputs"].items()}}

    shares = [criterion(half(part), targets[part], step_targets=targets) for part in (slice(0, 2), slice(2, 4))]
    for name in ("loss_ce", "loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"):
        assert (shares[0][name] + shares[1][name]).item() == pytest.approx(whole[name].item(), rel=1e-5), name


def test_perfect_predictions_have_zero_box_loss_and_class_error():
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]])}]
    logits = torch.full((1, 4, K + 1), -10.0)
    logits[0, :, K] = 10.0  # queries 2, 3: confident "no object"
    logits[0, 0, 2] = logits[0, 1, 0] = 20.0
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1], [0.5, 0.5, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]])
    losses = _criterion(False)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-5)  # GIoU eps 1e-7 per box
    assert losses["loss_ce"].item() < 1e-4
    assert losses["class_error"].item() == 0.0 and losses["cardinality_error"].item() == 0.0
    logits[0, 2, 1] = 30.0  # one extra predicted object
    losses = _criterion(False)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["cardinality_error"].item() == 1.0


def test_logged_errors_carry_no_gradient(make_targets):
    losses = _criterion(True)(_outputs(2, 5, K, seed=1), make_targets([2, 1], K))
    assert not losses["class_error"].requires_grad and not losses["cardinality_error"].requires_grad
    assert losses["weighted_total"].requires_grad


@pytest.mark.parametrize("focal", [False, True], ids=["ce", "focal"])
def test_images_without_targets(focal, make_targets):
    outputs = _outputs(2, 5, K if focal else K + 1, seed=2, aux=1)
    losses = _criterion(focal)(outputs, make_targets([0, 0], K))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    losses["weighted_total"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0  # "no object" is still learned


def test_build_criterion_follows_the_architecture(tiny_config):
    detr = build_criterion(tiny_config("detr"), K)
    assert detr.class_loss == "ce" and detr.matcher.class_cost == "softmax"
    assert sorted(detr.weight_dict) == sorted(
        n + s for n in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")  # 3 decoder layers
    )
    assert build_criterion(tiny_config("detr", aux_loss=False), K).weight_dict == {
        "loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0
    }
    config = tiny_config("deformable_two_stage", loss={"focal_alpha": 0.3, "focal_gamma": 1.5, "class_loss_coef": 2.0})
    deformable = build_criterion(config, K)
    assert deformable.class_loss == "focal" and deformable.matcher.class_cost == "focal"
    assert deformable.focal_alpha == deformable.matcher.focal_alpha == 0.3
    assert deformable.focal_gamma == deformable.matcher.focal_gamma == 1.5
    assert deformable.weight_dict["loss_ce_enc"] == 2.0 and deformable.weight_dict["loss_bbox_1"] == 5.0


def _distributed_worker(rank: int, world: int, init_file: str, boxes_per_rank: list[int], results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        targets = [{"labels": torch.zeros(boxes_per_rank[rank], dtype=torch.int64)}]
        results[rank] = average_num_boxes(targets, torch.device("cpu")).item()
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_across_processes(tmp_path):
    assert average_num_boxes([{"labels": torch.zeros(0)}], torch.device("cpu")).item() == 1.0  # clamped
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), [1, 6], results), nprocs=2,
                       start_method="spawn")
    assert dict(results) == {0: 3.5, 1: 3.5}
