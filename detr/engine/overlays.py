"""Predictions drawn on a few validation images, for people to look at after each evaluation.

Each image carries a caption with the score threshold and what is drawn: early in training often no
prediction reaches the threshold, and the caption says so (with the best score found) rather than
leaving a picture of the ground truth alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes

from detr.config import TransformsSpec
from detr.data.dataset import DetectionDataset
from detr.data.loader import DetectionTorchDataset, read_rgb_image
from detr.data.show import class_colour
from detr.data.transforms import build_split_transforms
from detr.engine.drawing import add_caption
from detr.models.detection_params import DEFAULT_SCORE_THRESHOLD

if TYPE_CHECKING:
    from detr.engine.trainer import Trainer

GROUND_TRUTH_COLOUR = "white"


class OverlayRenderer:
    """Callable returning ``(name, uint8 [H, W, 3])`` pairs: ground truth in thin white boxes,
    predictions (score >= ``score_threshold``, by default the serving one) in class colours with
    name and score, and a caption naming the threshold."""

    def __init__(self, trainer: Trainer, dataset: DetectionDataset, transforms: TransformsSpec,
                 num_images: int, score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> None:
        self.trainer = trainer
        self.dataset = dataset
        self.items = DetectionTorchDataset(dataset, build_split_transforms(transforms, "val"))
        self.indices = list(range(min(num_images, len(dataset))))
        self.score_threshold = score_threshold

    @torch.no_grad()
    def __call__(self) -> list[tuple[str, np.ndarray]]:
        trainer = self.trainer
        model = trainer.ema.module if trainer.ema is not None else trainer.model
        model = model.module if hasattr(model, "module") else model
        model.eval()
        names = self.dataset.label_map.names
        drawn = []
        for index in self.indices:
            image, target = self.items[index]
            outputs = model(image[None].to(trainer.device), None)
            prediction = trainer.postprocess(outputs, target["orig_size"][None].to(trainer.device))[0]
            keep = prediction["scores"] >= self.score_threshold
            boxes, scores = prediction["boxes"][keep].cpu(), prediction["scores"][keep].cpu()
            labels = prediction["label_ids"][keep].cpu()
            record = self.dataset.records[index]
            canvas = read_rgb_image(record)
            if record.num_boxes:
                canvas = draw_bounding_boxes(canvas, torch.from_numpy(record.boxes.copy()),
                                             colors=GROUND_TRUTH_COLOUR, width=1)
            if len(boxes):
                captions = [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(labels, scores)]
                canvas = draw_bounding_boxes(canvas, boxes, labels=captions,
                                             colors=[class_colour(int(c)) for c in labels], width=2)
            drawn.append((f"{record.image_id}", add_caption(canvas, self.caption(prediction, len(boxes)))))
        return drawn

    def caption(self, prediction: dict, shown: int) -> list[str]:
        threshold = f"score >= {self.score_threshold:.2f}"
        if shown:
            return [f"{shown} predictions with {threshold} (class colours); white: ground truth"]
        scores = prediction["scores"]
        if len(scores) == 0:
            return ["no predictions at all; white: ground truth only"]
        best = int(scores.argmax())
        name = self.dataset.label_map.names[int(prediction["label_ids"][best])]
        return [f"no prediction has {threshold} (best: {name} {float(scores[best]):.2f}); "
                "white: ground truth only"]
