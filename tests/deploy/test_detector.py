"""The serving inference path against the library's own: the checkpoint's validation transform, then
``detr.predict``; box formats against hand-written conversions; parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

import detr
from deploy.detector import DetectionParams, Detector
from deploy.packaging import inference_checkpoint
from detr.checkpoints.format import load_checkpoint, save_checkpoint
from detr.errors import InvalidInputError
from tests.deploy.conftest import CLASSES

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def reference_detections(model, pixels: np.ndarray, threshold: float, max_detections: int) -> dict:
    """Resize (shorter side 96, longer at most 128) + normalize by hand, then detr.predict."""
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    height, width = image.shape[1:]
    resized = F.resize(image, [96], max_size=128, antialias=True)
    inputs = F.normalize(resized.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    (found,) = detr.predict(model, [inputs], score_threshold=threshold, max_detections=max_detections,
                            image_sizes=[(height, width)])
    boxes = found["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)  # served boxes are clipped to the image
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return {"boxes": boxes, "scores": found["scores"], "label_ids": found["label_ids"]}


@pytest.mark.parametrize("which", ["detr_checkpoint", "deformable_checkpoint"])
def test_detections_equal_the_library_path(which, request, request_images):
    checkpoint = request.getfixturevalue(which)
    detector = Detector.from_checkpoint(checkpoint)
    model, _, _ = detr.load_model(checkpoint)
    # Threshold 0: every candidate, so the comparison covers the ordering of the whole top-k.
    params = DetectionParams(score_threshold=0.0, max_detections=12)
    records = detector.detect([torch.from_numpy(p).permute(2, 0, 1) for p in request_images], params)
    assert len(records) == len(request_images)
    for pixels, record in zip(request_images, records):
        expected = reference_detections(model, pixels, 0.0, 12)
        assert record["image_size"] == [pixels.shape[1], pixels.shape[0]]
        # DETR: one candidate per query (8); Deformable: query x class pairs (24), top 12.
        assert len(record["scores"]) == len(expected["scores"]) == (8 if which == "detr_checkpoint" else 12)
        np.testing.assert_allclose(record["scores"], expected["scores"].numpy(), rtol=1e-4, atol=1e-5)
        assert record["label_ids"] == expected["label_ids"].tolist()
        assert record["labels"] == [CLASSES[i] for i in record["label_ids"]]
        np.testing.assert_allclose(record["boxes"], expected["boxes"].numpy(), rtol=1e-4, atol=1e-3)


def test_an_image_gets_the_same_detections_whatever_else_the_request_holds(detr_checkpoint, request_images):
    detector = Detector.from_checkpoint(detr_checkpoint, batch_size=2)
    images = [torch.from_numpy(p).permute(2, 0, 1) for p in request_images]
    params = DetectionParams(score_threshold=0.0)
    alone = detector.detect(images[1:2], params)[0]
    mixed = detector.detect([images[0], images[1], images[0], images[2], images[1]], params)
    for record in (mixed[1], mixed[4]):
        np.testing.assert_allclose(record["scores"], alone["scores"], rtol=1e-5)
        np.testing.assert_allclose(record["boxes"], alone["boxes"], rtol=1e-5, atol=1e-4)
    assert mixed[0]["scores"] == mixed[2]["scores"]


def test_threshold_and_max_detections_cut_the_ranked_list(detr_checkpoint, request_images):
    detector = Detector.from_checkpoint(detr_checkpoint)
    image = [torch.from_numpy(request_images[0]).permute(2, 0, 1)]
    (full,) = detector.detect(image, DetectionParams(score_threshold=0.0, max_detections=1000))
    assert len(full["scores"]) == 8  # DETR: one detection per query (TINY has 8)
    assert full["scores"] == sorted(full["scores"], reverse=True)
    cut = full["scores"][3]
    (kept,) = detector.detect(image, DetectionParams(score_threshold=cut, max_detections=1000))
    assert kept["scores"] == [s for s in full["scores"] if s >= cut]
    (top2,) = detector.detect(image, DetectionParams(score_threshold=0.0, max_detections=2))
    assert top2["boxes"] == full["boxes"][:2]


def test_box_formats(detr_checkpoint, request_images):
    detector = Detector.from_checkpoint(detr_checkpoint)
    image = [torch.from_numpy(request_images[1]).permute(2, 0, 1)]
    (xyxy,) = detector.detect(image, DetectionParams(score_threshold=0.0, box_format="xyxy"))
    (xywh,) = detector.detect(image, DetectionParams(score_threshold=0.0, box_format="xywh"))
    (cxcywh,) = detector.detect(image, DetectionParams(score_threshold=0.0, box_format="cxcywh"))
    corners = np.array(xyxy["boxes"])
    x1, y1, x2, y2 = corners.T
    np.testing.assert_allclose(xywh["boxes"], np.stack([x1, y1, x2 - x1, y2 - y1], 1), atol=1e-4)
    np.testing.assert_allclose(cxcywh["boxes"], np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1),
                               atol=1e-4)
    width, height = xyxy["image_size"]
    assert (x1 >= 0).all() and (x2 <= width).all() and (y1 >= 0).all() and (y2 <= height).all()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"score_threshold": 1.5}, r"score_threshold must be a number in \[0, 1\], got 1.5"),
        ({"score_threshold": "high"}, "score_threshold"),
        ({"max_detections": 0}, r"max_detections must be an integer in \[1, 1000\], got 0"),
        ({"max_detections": 2.5}, "max_detections"),
        ({"max_detections": True}, "max_detections"),
        ({"box_format": "yxyx"}, "box_format must be one of xyxy, xywh, cxcywh, got 'yxyx'"),
    ],
)
def test_bad_params(changes, message):
    with pytest.raises(InvalidInputError, match=message):
        DetectionParams(**changes)


def test_images_must_be_rgb_uint8(detr_checkpoint):
    detector = Detector.from_checkpoint(detr_checkpoint)
    with pytest.raises(InvalidInputError, match="uint8 RGB image"):
        detector.detect([torch.zeros((1, 32, 32), dtype=torch.uint8)])
    with pytest.raises(InvalidInputError, match="uint8 RGB image"):
        detector.detect([torch.zeros((3, 32, 32))])


def test_metadata_names_the_model(detr_checkpoint):
    meta = Detector.from_checkpoint(detr_checkpoint).metadata()
    assert meta["arch"] == "detr"
    assert meta["classes"] == list(CLASSES)
    assert [step["name"] for step in meta["preprocessing"]] == ["resize", "normalize"]


def test_inference_checkpoint_keeps_ema_weights_and_drops_training_state(detr_checkpoint, tmp_path):
    data = load_checkpoint(detr_checkpoint)
    ema = {f"module.{k}": v + 1.0 if v.is_floating_point() else v for k, v in data["model"].items()}
    training = save_checkpoint(tmp_path / "train.pt", {
        **data, "ema": {**ema, "n_averaged": torch.tensor(3)}, "optimizer": {"state": {}, "param_groups": []},
        "mlflow_run_id": "abc123",
    })
    written, run_id = inference_checkpoint(training, tmp_path / "serve.pt")
    served = load_checkpoint(written)
    assert run_id == "abc123"
    assert "optimizer" not in served and "ema" not in served
    for key, value in data["model"].items():
        torch.testing.assert_close(served["model"][key], ema[f"module.{key}"])
    assert served["label_map"] == data["label_map"]
