"""Model outputs -> detections in pixels: the one post-processing shared by evaluation and serving.

DETR ("softmax"): each query is one detection, labelled with its best real class (the no-object
probability is dropped). Deformable DETR ("sigmoid"): the top-k (query, class) pairs by sigmoid
score over all Q x K, so one query may yield several classes, as in the paper's evaluation.
Boxes come out as xyxy in pixels of the size given per image (normally the original image size;
the model's normalized boxes are relative to the unpadded input, so any resize cancels out).

``predict`` is the one inference path: ``detr.predict`` and the serve side's ``Detector`` both run it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torchvision.ops import box_convert

from detr.errors import InvalidInputError
from detr.models.detection_params import DetectionParams
from detr.models.inputs import check_model_inputs, pad_images


class PostProcess(nn.Module):
    """Args:
        class_activation: "softmax" (DETR, logits [B, Q, K + 1]) or "sigmoid" (Deformable DETR).
        max_detections: detections kept per image, best first (the paper's 100).
    """

    def __init__(self, class_activation: Literal["softmax", "sigmoid"], max_detections: int = 100) -> None:
        super().__init__()
        if class_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown class activation {class_activation!r}; accepted: softmax, sigmoid")
        if max_detections < 1:
            raise ValueError(f"max_detections must be at least 1, got {max_detections}")
        self.class_activation = class_activation
        self.max_detections = max_detections

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" [B, Q, K(+1)], "pred_boxes" [B, Q, 4] normalized cxcywh.
            target_sizes: [B, 2] (H, W) of each image the boxes are reported in.

        Returns:
            B dicts sorted by score: "scores" float [D], "label_ids" int64 [D], "boxes" float [D, 4]
            xyxy pixels, D = min(max_detections, candidates).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise InvalidInputError(f"target_sizes must be [B, 2] = [{logits.shape[0]}, 2] (H, W), "
                                    f"got {tuple(target_sizes.shape)}")
        b, q = logits.shape[:2]
        if self.class_activation == "softmax":
            scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)  # [B, Q]
            k = min(self.max_detections, q)
            scores, query_idx = scores.topk(k, dim=1)
            labels = labels.gather(1, query_idx)
        else:
            num_classes = logits.shape[-1]
            prob = logits.float().sigmoid().flatten(1)  # [B, Q*K]
            k = min(self.max_detections, prob.shape[1])
            scores, flat_idx = prob.topk(k, dim=1)
            query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
            labels = flat_idx % num_classes
        boxes = torch.gather(boxes.float(), 1, query_idx.unsqueeze(-1).expand(-1, -1, 4))  # [B, k, 4]
        h, w = target_sizes.to(boxes).unbind(1)
        scale = torch.stack([w, h, w, h], 1)[:, None, :]  # [B, 1, 4]
        boxes = box_convert(boxes, "cxcywh", "xyxy") * scale
        return [{"scores": s, "label_ids": ids, "boxes": bx} for s, ids, bx in zip(scores, labels, boxes)]


def postprocess_for(model: nn.Module, max_detections: int = 100) -> PostProcess:
    """The ``PostProcess`` matching a model's classifier (its ``class_activation`` attribute)."""
    activation = getattr(model, "class_activation", None)
    if activation is None:
        raise InvalidInputError(f"{type(model).__name__} is not a DETR model (no class_activation attribute)")
    return PostProcess(activation, max_detections)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor | Sequence[torch.Tensor],
    score_threshold: float = DetectionParams.score_threshold,
    *,
    max_detections: int = DetectionParams.max_detections,
    image_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Detect objects: forward, post-process, keep detections scoring at least ``score_threshold``.

    Args:
        model: a DETR or Deformable DETR model (put in eval mode for the call, then restored).
        images: already normalized (the val transform's normalize step), either a batch tensor
            [B, 3, H, W] of same-size images (no padding, no mask), or a list of [3, H_i, W_i]
            tensors of any sizes, which are padded into one batch with a padding mask.
        score_threshold: keep detections scoring at least this, in [0, 1].
        max_detections: at most this many detections per image, best first (at most 1000).
        image_sizes: (H, W) per image to report boxes in, e.g. the original sizes before the
            resize; default: each input image's own (unpadded) size.

    Returns:
        One dict per image on the CPU: "boxes" float32 [D, 4] xyxy pixels, "scores" float32 [D],
        "label_ids" int64 [D], sorted by score.
    """
    params = DetectionParams(score_threshold=score_threshold, max_detections=max_detections)
    device = next(model.parameters()).device
    if isinstance(images, torch.Tensor):
        check_model_inputs(images, None)
        batch, masks = images.to(device), None
        own_sizes = [tuple(images.shape[-2:])] * images.shape[0]
    else:
        batch, masks = pad_images([image.to(device) for image in images])
        own_sizes = [tuple(image.shape[-2:]) for image in images]
    sizes = torch.as_tensor(own_sizes if image_sizes is None else image_sizes, dtype=torch.float32)
    if sizes.shape != (len(own_sizes), 2):
        raise InvalidInputError(f"image_sizes must give (H, W) for each of the {len(own_sizes)} images, "
                                f"got shape {tuple(sizes.shape)}")
    # A model already in eval mode is left untouched, so that threads serving one model (the REST
    # app) never write to it.
    was_training = model.training
    if was_training:
        model.eval()
    try:
        outputs = model(batch, masks)
    finally:
        if was_training:
            model.train()
    detections = postprocess_for(model, params.max_detections)(outputs, sizes.to(device))
    results = []
    for det in detections:
        keep = det["scores"] >= params.score_threshold
        results.append({key: value[keep].cpu() for key, value in det.items()})
    return results
