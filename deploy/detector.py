"""A trained checkpoint as a detector: decoded images in, named detections in pixels out.

The serve side's entry to the one inference path (pyfunc model, REST app, ``detr predict``): the
checkpoint's own validation transform (resize + normalize, as evaluation applied it), batches of
same-size inputs (never padded, so an image's detections do not depend on the rest of the request),
``detr.predict`` (forward, post-processing, score threshold), and boxes clipped to the original image
and reported in its pixels in the requested format. Safe to call from several threads at once: the
model stays in eval mode and nothing is mutated per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import box_convert

from detr.config import ModelConfig, TransformsSpec
from detr.data.labelmap import LabelMap
from detr.data.transforms import DetectionTransforms, build_split_transforms
from detr.errors import InvalidInputError
from detr.models.detection_params import BOX_FORMATS, MAX_DETECTIONS_LIMIT, DetectionParams
from detr.models.postprocess import predict

__all__ = ["BOX_FORMATS", "MAX_DETECTIONS_LIMIT", "DetectionParams", "Detector"]


class Detector:
    """Args:
        model: a DETR or Deformable DETR in eval mode.
        model_config: its model settings (reported by ``metadata``).
        transforms: the transforms it was trained with; their ``val`` steps preprocess inputs.
        label_map: class names of its outputs.
        batch_size: images per forward pass (bounds memory for large requests).
    """

    def __init__(self, model: nn.Module, model_config: ModelConfig, transforms: TransformsSpec, label_map: LabelMap,
                 *, batch_size: int = 8) -> None:
        self.model = model.eval()
        self.model_config = model_config
        self.label_map = label_map
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.transforms: DetectionTransforms = build_split_transforms(transforms, "val")

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, device: str = "cpu", batch_size: int = 8) -> Detector:
        from detr.checkpoints.load import load_model

        model, config, label_map = load_model(checkpoint, device=device)
        return cls(model, config.model, config.data.transforms, label_map, batch_size=batch_size)

    def metadata(self) -> dict[str, Any]:
        """What a client may want to know before sending images (JSON-able)."""
        mc = self.model_config
        return {
            "arch": mc.arch,
            "backbone": mc.backbone.name,
            "num_queries": mc.num_queries,
            "classes": list(self.label_map.names),
            "preprocessing": [step.model_dump() for step in self.transforms.steps],
            "box_formats": list(BOX_FORMATS),
        }

    @torch.inference_mode()
    def detect(self, images: Sequence[torch.Tensor], params: DetectionParams = DetectionParams()) -> list[dict]:
        """
        Args:
            images: uint8 RGB tensors [3, H_i, W_i] of any sizes.

        Returns:
            One record per image: "boxes" [[4 floats]] in ``params.box_format`` pixels, "scores",
            "labels" (class names), "label_ids", "image_size" [width, height]; best score first.
        """
        inputs = [self._preprocess(image) for image in images]
        # Only inputs of the same size share a forward pass: padding changes what the backbone sees
        # at the borders, and an image's detections must not depend on what else the request holds.
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(inputs):
            by_size.setdefault(tuple(tensor.shape[1:]), []).append(index)
        records: list[dict | None] = [None] * len(images)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.stack([inputs[i] for i in chunk])
                sizes = [tuple(images[i].shape[1:]) for i in chunk]  # (H, W) of the original images
                detections = predict(self.model, batch, params.score_threshold,
                                     max_detections=params.max_detections, image_sizes=sizes)
                for i, det, size in zip(chunk, detections, sizes):
                    records[i] = self._record(det, size, params)
        return records

    def _preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> the validation transform's normalized float [3, H', W']."""
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise InvalidInputError(f"expected a uint8 RGB image [3, H, W], got {got}")
        height, width = int(image.shape[1]), int(image.shape[2])
        empty = {
            "boxes": tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY", canvas_size=(height, width)),
            "labels": torch.zeros((0,), dtype=torch.int64),
        }
        transformed, _ = self.transforms(tv_tensors.Image(image), empty)
        return transformed.as_subclass(torch.Tensor)

    def _record(self, det: dict[str, torch.Tensor], size: tuple[int, int], params: DetectionParams) -> dict:
        """``predict``'s detections of one image (on the CPU) -> the JSON-able record."""
        scores, label_ids = det["scores"], det["label_ids"]
        boxes = det["boxes"].clone()  # [D, 4] xyxy pixels
        height, width = size
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        if params.box_format != "xyxy":
            boxes = box_convert(boxes, "xyxy", params.box_format)
        return {
            "boxes": boxes.tolist(),
            "scores": scores.tolist(),
            "labels": [self.label_map.name_of(int(i)) for i in label_ids],
            "label_ids": label_ids.tolist(),
            "image_size": [width, height],
        }
