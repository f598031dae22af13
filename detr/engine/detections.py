"""The detections of one image as the evaluators consume them, and the checks on a prediction dict.

A prediction dict (what ``detr.predict`` and the trainer's postprocess return per image) holds
``image_id``, ``boxes`` [K, 4] xyxy in pixels of the original image, ``scores`` [K] and ``labels``
[K] contiguous class ids (``label_ids``, the name the postprocess and the serving output use, is
accepted in its place), as torch tensors or numpy arrays. :func:`detections_from_prediction`
checks one and turns it into an :class:`ImageDetections` of plain float64/int64 numpy arrays, so
the evaluators never see a tensor, a device or a dtype they did not expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from detr.errors import InvalidInputError

PREDICTION_KEYS = ("image_id", "boxes", "scores", "labels")


@dataclass(frozen=True)
class ImageDetections:
    """Detections of one image.

    Attributes:
        boxes: float64 [K, 4] (x1, y1, x2, y2) absolute pixels, x1 <= x2, y1 <= y2.
        scores: float64 [K] confidences; higher ranks first.
        labels: int64 [K] contiguous class ids.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> ImageDetections:
        return ImageDetections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))

    def of_class(self, class_id: int) -> ImageDetections:
        keep = self.labels == class_id
        return ImageDetections(self.boxes[keep], self.scores[keep], self.labels[keep])


def image_id_key(value: Any) -> int | str:
    """A prediction's ``image_id`` as the plain int or str that records use.

    Accepts Python ints/strs, numpy integer scalars and one-element integer tensors (what a data
    loader collates); anything else is an error.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise InvalidInputError(
                f"prediction image_id must be an int or str (or a one-element integer tensor), "
                f"got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        return int(value.item())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return value
    raise InvalidInputError(f"prediction image_id must be an int or str, got {type(value).__name__} {value!r}")


def _as_array(value: Any, field: str, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.to(torch.float64)  # numpy has no bfloat16
        return value.numpy()
    if isinstance(value, (np.ndarray, list, tuple)):
        return np.asarray(value)
    raise InvalidInputError(
        f"{where}: '{field}' must be a torch tensor or numpy array, got {type(value).__name__}"
    )


def detections_from_prediction(prediction: Mapping, num_classes: int, where: str) -> ImageDetections:
    """Check one prediction dict and convert it; ``where`` names it in error messages.

    Raises:
        InvalidInputError: a key is missing, a shape or dtype is wrong, a value is not finite, a
            label is outside ``0..num_classes-1`` or a box has x2 < x1 or y2 < y1.
    """
    if not isinstance(prediction, Mapping):
        raise InvalidInputError(f"{where}: a prediction must be a dict with keys {list(PREDICTION_KEYS)}, "
                                f"got {type(prediction).__name__}")
    if "labels" not in prediction and "label_ids" in prediction:
        prediction = {**prediction, "labels": prediction["label_ids"]}
    missing = [k for k in PREDICTION_KEYS if k not in prediction]
    if missing:
        raise InvalidInputError(f"{where}: prediction lacks {missing}; required keys: {list(PREDICTION_KEYS)}")
    boxes = _as_array(prediction["boxes"], "boxes", where)
    scores = _as_array(prediction["scores"], "scores", where)
    labels = _as_array(prediction["labels"], "labels", where)
    if boxes.size == 0 and scores.size == 0 and labels.size == 0:
        return ImageDetections.empty()
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidInputError(f"{where}: 'boxes' must have shape [K, 4] (x1, y1, x2, y2), got {boxes.shape}")
    k = boxes.shape[0]
    if scores.shape != (k,) or labels.shape != (k,):
        raise InvalidInputError(
            f"{where}: 'scores' and 'labels' must have shape [{k}] like 'boxes' [{k}, 4], "
            f"got {scores.shape} and {labels.shape}"
        )
    for name, array in (("boxes", boxes), ("scores", scores)):
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise InvalidInputError(f"{where}: '{name}' must be numeric, got dtype {array.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"{where}: 'labels' must be integer class ids, got dtype {labels.dtype}")
    boxes = boxes.astype(np.float64)
    scores = scores.astype(np.float64)
    labels = labels.astype(np.int64)
    if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
        raise InvalidInputError(f"{where}: 'boxes' and 'scores' must be finite (found NaN or inf)")
    bad_label = (labels < 0) | (labels >= num_classes)
    if bad_label.any():
        raise InvalidInputError(
            f"{where}: label {int(labels[bad_label][0])} is outside the label map's ids 0..{num_classes - 1}"
        )
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        i = int(np.flatnonzero(inverted)[0])
        raise InvalidInputError(
            f"{where}: box {i} {boxes[i].tolist()} has x2 < x1 or y2 < y1; boxes must be (x1, y1, x2, y2) pixels"
        )
    return ImageDetections(boxes, scores, labels)
