"""The package's public names (DESIGN.md "Public Python API") resolve, wherever their modules live."""

from __future__ import annotations

import inspect

import detr
import detr.data
import detr.ops


def test_the_public_names_resolve_to_their_functions():
    from detr.checkpoints.convert import convert_checkpoint
    from detr.checkpoints.load import load_model
    from detr.config import load_config
    from detr.data.formats import load_dataset
    from detr.models.build import build_model
    from detr.models.postprocess import predict
    from detr.ops.dispatch import ms_deform_attn

    assert detr.load_config is load_config and detr.build_model is build_model
    assert detr.load_model is load_model and detr.predict is predict
    assert detr.convert_checkpoint is convert_checkpoint
    assert detr.ops.ms_deform_attn is ms_deform_attn and detr.data.load_dataset is load_dataset


def test_predict_and_the_serve_side_share_one_default():
    from deploy.detector import DetectionParams

    defaults = inspect.signature(detr.predict).parameters
    assert defaults["score_threshold"].default == DetectionParams().score_threshold
    assert defaults["max_detections"].default == DetectionParams().max_detections
