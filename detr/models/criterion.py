"""The set criterion: Hungarian-match predictions to targets, then classification and box losses.

Losses per set of predictions (final layer, each auxiliary decoder layer ``_0`` ... ``_{L-2}``, and
the two-stage encoder proposals ``_enc``):
    loss_ce     classification. DETR: cross-entropy over K + 1 classes, the "no object" class
                weighted by ``eos_coef``. Deformable DETR: sigmoid focal loss summed over queries and
                classes and divided by the number of target boxes (the normalization of the
                official code; torchvision's ``sigmoid_focal_loss`` with reduction="sum").
    loss_bbox   L1 of matched normalized cxcywh boxes / number of boxes.
    loss_giou   1 - GIoU of matched boxes / number of boxes.
Logged only (no gradient, final layer only): class_error (% of matched predictions with the wrong
top class) and cardinality_error (|predicted objects - target objects| per image).
The two-stage encoder loss of Deformable DETR uses class-agnostic targets (every label 0: "an
object"), as the paper; two-stage DETR's encoder head learns the real classes (its top classes pick
the queries).
The number of boxes is averaged over processes when torch.distributed is initialised.

Training aids (outputs of a model in training mode, ``detr.models.training_queries``):
    query groups   pred_logits/pred_boxes hold K groups of Q queries ("query_groups": K): the
                   matcher matches each group alone and the losses are the mean over the groups
                   (the box count is K times the targets', as Group DETR).
    one_to_many    losses ``_o2m`` (and ``_o2m_{i}`` per auxiliary layer): Hungarian matching against
                   the targets repeated k times ("repeats"), normalized by k times the box count, as
                   H-DETR; weighted by the branch's loss weight.
    denoising      losses ``_dn`` (``_dn_{i}``): every positive copy is matched to the target it copies,
                   negatives and non-matched copies are "no object", padding takes no loss; boxes and
                   classes are normalized by (groups x the box count), so only the targets decide the
                   normalizers, as under accumulation.

Gradient accumulation: given ``step_targets`` (every target of the optimizer step), each loss is
this micro-batch's share of the loss of the whole step's batch: the sums are divided by the step's
box count (and, for the cross-entropy, by the step's total class weight), so the shares of the
micro-batches add up to the loss of the whole batch, whatever the box count of each micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from detr.models.matcher import HungarianMatcher


def loss_weights(
    class_loss_coef: float, bbox_loss_coef: float, giou_loss_coef: float, *, num_aux_layers: int, two_stage: bool,
    one_to_many_weight: float | None = None, denoising: bool = False,
) -> dict[str, float]:
    """DETR's weight_dict: the weight of every loss term the criterion returns for a model with
    ``num_aux_layers`` auxiliary decoder outputs (and encoder proposals when ``two_stage``), a
    one-to-many branch weighted ``one_to_many_weight`` (None: no branch) and denoising queries
    (weighted as the matching queries, as DN-DETR)."""
    base = {"loss_ce": class_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    layers = [""] + [f"_{i}" for i in range(num_aux_layers)]
    scaled = {suffix: 1.0 for suffix in layers + (["_enc"] if two_stage else [])}
    if one_to_many_weight is not None:
        scaled.update({"_o2m" + layer: one_to_many_weight for layer in layers})
    if denoising:
        scaled.update({"_dn" + layer: 1.0 for layer in layers})
    return {name + suffix: weight * scale for suffix, scale in scaled.items() for name, weight in base.items()}


class SetCriterion(nn.Module):
    """Args:
        num_classes: K real classes.
        matcher: the ``HungarianMatcher`` (its class cost should match ``class_loss``).
        weight_dict: the weight of every loss term (``loss_weights``); the terms of ``weighted_total``.
        class_loss: "ce" (DETR, logits [B, Q, K + 1]) or "focal" (Deformable DETR, logits [B, Q, K]).
        eos_coef: weight of the no-object class in the cross-entropy.
        focal_alpha, focal_gamma: focal loss parameters.
        class_agnostic_encoder: the ``enc_outputs`` loss with every target labelled 0 (two-stage
            Deformable DETR) rather than with its class (two-stage DETR).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        *,
        class_loss: Literal["ce", "focal"] = "ce",
        eos_coef: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_agnostic_encoder: bool = True,
    ) -> None:
        super().__init__()
        if class_loss not in ("ce", "focal"):
            raise ValueError(f"unknown class loss {class_loss!r}; accepted: ce, focal")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_loss = class_loss
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.class_agnostic_encoder = class_agnostic_encoder
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(
        self, outputs: dict, targets: list[dict], step_targets: list[dict] | None = None
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: the model's dict (pred_logits, pred_boxes, optional aux_outputs, enc_outputs).
            targets: one dict per image: "labels" int64 [N], "boxes" [N, 4] normalized cxcywh.
            step_targets: the targets of every micro-batch of the optimizer step, ``targets``
                included, when the step accumulates gradients over micro-batches: the losses are
                then this micro-batch's share (they sum to the whole batch's loss). None: the
                step is this batch alone.

        Returns:
            Named scalar losses (see the module docstring), "class_error", "cardinality_error", and
            "weighted_total": the sum of every loss times its ``weight_dict`` weight (what the
            optimizer minimizes).
        """
        device = outputs["pred_logits"].device
        num_boxes = average_num_boxes(targets if step_targets is None else step_targets, device)
        losses: dict[str, torch.Tensor] = {}
        indices = self.matcher(outputs, targets)
        losses.update(self._set_losses(outputs, targets, indices, num_boxes, step_targets, suffix=""))
        losses.update(self._logged_errors(outputs, targets, indices))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._set_losses(aux, targets, self.matcher(aux, targets), num_boxes, step_targets,
                                           suffix=f"_{i}"))
        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            enc_targets = _class_agnostic(targets) if self.class_agnostic_encoder else targets
            enc_indices = self.matcher(enc, enc_targets)
            # (The step's class weights count boxes only: its targets serve either kind.)
            losses.update(self._set_losses(enc, enc_targets, enc_indices, num_boxes, step_targets, suffix="_enc"))
        if "one_to_many" in outputs:
            losses.update(self._one_to_many_losses(outputs["one_to_many"], targets, step_targets))
        if "denoising" in outputs:
            losses.update(self._denoising_losses(outputs["denoising"], targets, num_boxes, step_targets))
        unweighted = sorted(k for k in losses if k.startswith("loss_") and k not in self.weight_dict)
        if unweighted:
            raise ValueError(f"loss terms {unweighted} have no weight: the criterion was built for another model "
                             f"(weights for {sorted(self.weight_dict)})")
        losses["weighted_total"] = sum(losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict)
        return losses

    def _set_losses(
        self, outputs: dict, targets: list[dict], indices, num_boxes: torch.Tensor,
        step_targets: list[dict] | None, suffix: str,
    ) -> dict:
        # Query groups: every group is a full set of predictions; the loss is the groups' mean.
        groups = outputs.get("query_groups", 1)
        num_boxes = num_boxes * groups
        # The cross-entropy's normalizer for the whole step (None: this batch's own weighted mean),
        # for this set's number of predictions (Q queries, or S encoder positions) per group.
        class_weight = None if step_targets is None else groups * self._class_weight_total(
            step_targets, num_queries=outputs["pred_logits"].shape[1] // groups)
        return {
            "loss_ce" + suffix: self.loss_labels(outputs, targets, indices, num_boxes, class_weight),
            **{k + suffix: v for k, v in self.loss_boxes(outputs, targets, indices, num_boxes).items()},
        }

    def loss_labels(
        self, outputs: dict, targets: list[dict], indices, num_boxes: torch.Tensor, class_weight: float | None = None
    ) -> torch.Tensor:
        """``class_weight``: the cross-entropy's normalizer when it is not this batch's own summed
        class weight (gradient accumulation, see ``forward``)."""
        # float32 even under autocast: the focal terms of 0.01-probability negatives underflow in half.
        logits = outputs["pred_logits"].float()  # [B, Q, K+1] (ce) or [B, Q, K] (focal)
        batch_idx, src_idx = _prediction_index(indices, logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        # Every prediction is "no object" (index K) unless matched.
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = matched_labels
        if self.class_loss == "ce":
            weight = self.empty_weight.float()
            # Sum of weight[target] * nll over the B x Q predictions; divided by the summed weights it
            # is F.cross_entropy's weighted mean (by the step's summed weights under accumulation).
            loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight, reduction="sum")
            return loss / (weight[target_classes].sum() if class_weight is None else class_weight)
        # One-hot over K + 1 then drop the no-object column: unmatched rows are all zeros.
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()
        loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        return loss / num_boxes

    def loss_boxes(self, outputs: dict, targets: list[dict], indices, num_boxes: torch.Tensor) -> dict:
        pred_boxes = outputs["pred_boxes"].float()
        batch_idx, src_idx = _prediction_index(indices, pred_boxes.device)
        src = pred_boxes[batch_idx, src_idx]  # [M, 4] cxcywh
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)  # [M, 4]
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(
            box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum"
        ) / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _one_to_many_losses(self, o2m: dict, targets: list[dict], step_targets: list[dict] | None) -> dict:
        """H-DETR's one-to-many branch: Hungarian matching against every target repeated k times."""
        k = o2m["repeats"]
        many = _repeat_targets(targets, k)
        step_many = None if step_targets is None else _repeat_targets(step_targets, k)
        num_boxes = average_num_boxes(many if step_many is None else step_many, o2m["pred_logits"].device)
        losses = {}
        sets = [("_o2m", o2m)] + [(f"_o2m_{i}", aux) for i, aux in enumerate(o2m.get("aux_outputs", []))]
        for suffix, predictions in sets:
            indices = self.matcher(predictions, many)
            losses.update(self._set_losses(predictions, many, indices, num_boxes, step_many, suffix=suffix))
        return losses

    def _denoising_losses(self, dn: dict, targets: list[dict], num_boxes: torch.Tensor,
                          step_targets: list[dict] | None) -> dict:
        """Every positive copy reconstructs its target; the rest of the valid copies are "no object"."""
        valid, target_index = dn["valid"], dn["target_index"]  # [B, P] each
        indices = []
        for i in range(len(targets)):
            query = torch.nonzero(target_index[i] >= 0).flatten()
            indices.append((query.cpu(), target_index[i, query].cpu()))
        groups, copies = dn["groups"], dn["copies"]
        num_boxes = num_boxes * groups
        # The cross-entropy's summed class weights: per target, `groups` positives (weight 1) and,
        # with negatives, `groups` of them (weight eos_coef). From the box count of the step, averaged
        # over processes: exact under gradient accumulation and DistributedDataParallel alike.
        class_weight = (1.0 + (copies - 1) * self.eos_coef) * num_boxes
        losses = {}
        sets = [("_dn", dn)] + [(f"_dn_{i}", aux) for i, aux in enumerate(dn.get("aux_outputs", []))]
        for suffix, predictions in sets:
            if predictions["pred_logits"].shape[1] == 0:  # no targets in the batch: zero losses, graph kept
                zero = predictions["pred_logits"].sum() * 0.0
                losses.update({name + suffix: zero for name in ("loss_ce", "loss_bbox", "loss_giou")})
                continue
            losses["loss_ce" + suffix] = self._denoising_class_loss(predictions, targets, indices, valid, num_boxes,
                                                                    class_weight)
            losses.update({k + suffix: v for k, v in self.loss_boxes(predictions, targets, indices, num_boxes).items()})
        return losses

    def _denoising_class_loss(self, outputs: dict, targets: list[dict], indices, valid: torch.Tensor,
                              num_boxes: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
        logits = outputs["pred_logits"].float()  # [B, P, K(+1)]
        batch_idx, src_idx = _prediction_index(indices, logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = matched_labels
        if self.class_loss == "ce":
            nll = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")  # [B, P]
            weight = self.empty_weight.float()[target_classes] * valid
            return (weight * nll).sum() / class_weight
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()
        loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        return (loss.sum(-1) * valid).sum() / num_boxes

    def _class_weight_total(self, targets: list[dict], *, num_queries: int) -> float:
        """The summed cross-entropy class weights of a batch of ``targets``: Hungarian matching
        pairs min(N, Q) of an image's Q predictions with its N targets (weight 1), the rest are "no
        object" (weight ``eos_coef``). Known from the targets alone, before any matching."""
        total = 0.0
        for target in targets:
            matched = min(len(target["labels"]), num_queries)
            total += matched + (num_queries - matched) * self.eos_coef
        return total

    @torch.no_grad()
    def _logged_errors(self, outputs: dict, targets: list[dict], indices) -> dict:
        # Query groups: the errors of group 0, the predictions inference makes.
        q = outputs["pred_logits"].shape[1] // outputs.get("query_groups", 1)
        indices = [(src[src < q], tgt[src < q]) for src, tgt in indices]
        logits = outputs["pred_logits"][:, :q]
        batch_idx, src_idx = _prediction_index(indices, logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        if len(matched_labels):
            accuracy = (logits[batch_idx, src_idx].argmax(-1) == matched_labels).float().mean() * 100
            class_error = 100 - accuracy
        else:
            class_error = logits.new_zeros(())
        # An object is predicted where "no object" does not win (softmax) or some class has p > 0.5.
        if self.class_loss == "ce":
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        else:
            predicted = (logits.sigmoid().max(-1).values > 0.5).sum(1)
        sizes = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        cardinality_error = F.l1_loss(predicted.float(), sizes.float())
        return {"class_error": class_error.detach(), "cardinality_error": cardinality_error}


def average_num_boxes(targets: list[dict], device: torch.device) -> torch.Tensor:
    """Target boxes per process, averaged over processes (all_reduce) and at least 1: the common
    normalizer that makes the loss independent of how the batch is split across processes."""
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes = num_boxes / dist.get_world_size()
    return num_boxes.clamp(min=1)[0]


def _repeat_targets(targets: list[dict], k: int) -> list[dict]:
    """Every target box (and label) k times: the one-to-many branch's targets."""
    return [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]


def _class_agnostic(targets: list[dict]) -> list[dict]:
    return [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]


def _prediction_index(indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, query index) of every matched prediction, concatenated over the batch."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
    src_idx = torch.cat([src for src, _ in indices]).to(device)
    return batch_idx, src_idx
