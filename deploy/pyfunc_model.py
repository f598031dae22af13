"""The MLflow pyfunc model: base64 images in a DataFrame in, one detection record per image out.

Input: a DataFrame with a string column ``image`` (base64 JPEG/PNG, one image per row). Params
(declared in the signature, so ``mlflow models serve`` passes them): ``score_threshold``,
``max_detections``, ``box_format``. Output: a list of records (see ``Detector.detect``), which the
scoring server answers as ``{"predictions": [...]}``.

A bad request raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server
answers 400 with the message and stays up. The message names the row and the problem, never the
payload: the scoring server rewrites a model's message to ``Failed to predict data '<the whole
DataFrame>'. Error: <message>``, so the exception raised here keeps its own message first
(``RequestError``). Limits: those of ``detr serve`` (``deploy.images``): at most
``DEFAULT_MAX_IMAGES`` rows, each image's encoded size and pixel count capped.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from deploy.detector import Detector
from deploy.images import DEFAULT_MAX_IMAGES, ImageLimits, decode_base64_image
from detr.errors import DetrError, InvalidInputError
from detr.models.detection_params import DetectionParams

IMAGE_COLUMN = "image"
CHECKPOINT_ARTIFACT = "checkpoint"
# Rows one request may hold: bounds the memory of a request (each row is an image).
MAX_IMAGES_PER_REQUEST = int(os.environ.get("DETR_SERVE_MAX_IMAGES", str(DEFAULT_MAX_IMAGES)))


class RequestError(MlflowException):
    """A bad request (400) whose message stays what the model said.

    MLflow's scoring server prepends ``Failed to predict data '<the request's DataFrame>'`` to the
    message of an ``MlflowException`` raised by ``predict``: with base64 images that is megabytes of
    text before the problem. This exception's message stays the problem alone.
    """

    def __init__(self, message: str) -> None:
        self._problem = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        self._message = self._problem if self._problem in value and value != self._problem else value



class DetrPythonModel(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint artifact into a :class:`Detector` (CPU unless ``DETR_SERVE_DEVICE``)."""

    def __init__(self) -> None:
        self.detector: Detector | None = None
        self.limits = ImageLimits()

    def load_context(self, context) -> None:
        device = os.environ.get("DETR_SERVE_DEVICE", "cpu")
        self.detector = Detector.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[dict]:
        if self.detector is None:
            raise MlflowException("the model was not loaded (load_context was not called)")
        try:
            detection_params = _detection_params(params or {})
            images = [decode_base64_image(value, where=f"row {i}, column {IMAGE_COLUMN!r}", limits=self.limits)
                      for i, value in enumerate(_image_column(model_input))]
            return self.detector.detect(images, detection_params)
        except DetrError as e:
            raise RequestError(str(e)) from None


def _image_column(model_input: Any) -> list:
    if not isinstance(model_input, pd.DataFrame):
        raise InvalidInputError(
            f"expected a DataFrame with a string column {IMAGE_COLUMN!r}, got {type(model_input).__name__}")
    if IMAGE_COLUMN not in model_input.columns:
        raise InvalidInputError(
            f"the input has no column {IMAGE_COLUMN!r} (columns: {list(map(str, model_input.columns))}); "
            f"send one row per image with the base64 JPEG/PNG in {IMAGE_COLUMN!r}")
    values = model_input[IMAGE_COLUMN].tolist()
    if not values:
        raise InvalidInputError("the request holds no image: send at least one row")
    if len(values) > MAX_IMAGES_PER_REQUEST:
        raise InvalidInputError(f"the request holds {len(values)} images; at most {MAX_IMAGES_PER_REQUEST} per "
                                "request (DETR_SERVE_MAX_IMAGES)")
    return values


def _detection_params(params: dict[str, Any]) -> DetectionParams:
    known = {"score_threshold", "max_detections", "box_format"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidInputError(f"unknown params {unknown}; accepted: {sorted(known)}")
    defaults = DetectionParams()
    max_detections = params.get("max_detections", defaults.max_detections)
    if isinstance(max_detections, float) and max_detections.is_integer():
        max_detections = int(max_detections)
    return DetectionParams(
        score_threshold=params.get("score_threshold", defaults.score_threshold),
        max_detections=max_detections,
        box_format=params.get("box_format", defaults.box_format),
    )
