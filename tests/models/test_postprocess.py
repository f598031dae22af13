"""Post-processing (softmax / sigmoid top-k, pixel boxes) and ``predict``."""

from __future__ import annotations

import pytest
import torch

from detr.errors import InvalidInputError
from detr.models.build import build_model, build_postprocess
from detr.models.inputs import pad_images
from detr.models.postprocess import PostProcess, predict

K = 3


def test_boxes_are_xyxy_pixels_of_the_target_size():
    logits = torch.zeros(1, 1, K + 1)
    boxes = torch.tensor([[[0.5, 0.25, 0.2, 0.1]]])  # cx, cy, w, h normalized
    det = PostProcess("softmax")({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    torch.testing.assert_close(det["boxes"], torch.tensor([[80.0, 20.0, 120.0, 30.0]]))


def test_softmax_drops_no_object_and_sorts_by_score():
    logits = torch.tensor([[[0.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 9.0], [0.0, 0.0, 4.0, 0.0]]])
    boxes = torch.rand(1, 3, 4) * 0.5 + 0.25
    det = PostProcess("softmax")({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 10]]))[0]
    probs = logits[0].softmax(-1)
    expected_scores, expected_labels = probs[:, :K].max(-1)
    order = expected_scores.argsort(descending=True)
    torch.testing.assert_close(det["scores"], expected_scores[order])
    assert det["label_ids"].tolist() == expected_labels[order].tolist()
    assert det["scores"][-1] < 0.02  # query 1 is confidently "no object": its best real class scores low
    assert det["label_ids"].dtype == torch.int64


def test_sigmoid_takes_top_k_over_queries_and_classes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, K, generator=g)
    boxes = torch.rand(2, 5, 4, generator=g) * 0.5 + 0.25
    sizes = torch.tensor([[50, 60], [70, 80]])
    dets = PostProcess("sigmoid", max_detections=4)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for i, det in enumerate(dets):
        pairs = sorted(((logits[i, q, k].sigmoid().item(), q, k) for q in range(5) for k in range(K)), reverse=True)[:4]
        assert det["scores"].tolist() == pytest.approx([s for s, _, _ in pairs])
        assert det["label_ids"].tolist() == [k for _, _, k in pairs]
        h, w = sizes[i].tolist()
        for box, (_, q, _) in zip(det["boxes"], pairs):
            cx, cy, bw, bh = boxes[i, q].tolist()
            expected = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            torch.testing.assert_close(box, expected)


def test_max_detections_caps_the_candidates():
    outputs = {"pred_logits": torch.randn(1, 5, K + 1), "pred_boxes": torch.rand(1, 5, 4)}
    assert len(PostProcess("softmax", max_detections=100)(outputs, torch.tensor([[9, 9]]))[0]["scores"]) == 5
    assert len(PostProcess("softmax", max_detections=2)(outputs, torch.tensor([[9, 9]]))[0]["scores"]) == 2
    sig = {"pred_logits": torch.randn(1, 5, K), "pred_boxes": torch.rand(1, 5, 4)}
    assert len(PostProcess("sigmoid", max_detections=100)(sig, torch.tensor([[9, 9]]))[0]["scores"]) == 5 * K


def test_bad_target_sizes():
    outputs = {"pred_logits": torch.randn(2, 5, K + 1), "pred_boxes": torch.rand(2, 5, 4)}
    with pytest.raises(InvalidInputError, match=r"target_sizes must be \[B, 2\]"):
        PostProcess("softmax")(outputs, torch.tensor([[9, 9]]))


def test_build_postprocess_follows_the_architecture(tiny_config):
    assert build_postprocess(tiny_config("detr")).class_activation == "softmax"
    post = build_postprocess(tiny_config("deformable_refine", max_detections=7))
    assert post.class_activation == "sigmoid" and post.max_detections == 7


@pytest.fixture(scope="module")
def tiny_detr(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config("detr"), K)


def test_predict_batch_tensor_equals_list_of_same_size_images(tiny_detr):
    images = torch.randn(2, 3, 48, 64)
    a = predict(tiny_detr, images, score_threshold=0.0)
    b = predict(tiny_detr, list(images), score_threshold=0.0)
    for x, y in zip(a, b):
        assert set(x) == {"boxes", "scores", "label_ids"}
        for key in x:
            torch.testing.assert_close(x[key], y[key])


def test_predict_list_of_sizes_reports_each_in_its_own_pixels(tiny_detr):
    images = [torch.randn(3, 48, 64), torch.randn(3, 32, 40)]
    dets = predict(tiny_detr, images, score_threshold=0.0)
    batch, masks = pad_images(images)
    tiny_detr.eval()
    with torch.no_grad():
        outputs = tiny_detr(batch, masks)
    expected = PostProcess("softmax")(outputs, torch.tensor([[48, 64], [32, 40]]))
    for det, exp in zip(dets, expected):
        torch.testing.assert_close(det["boxes"], exp["boxes"])
    # Reporting in the original (pre-resize) size scales the boxes.
    scaled = predict(tiny_detr, images, 0.0, image_sizes=[(96, 128), (64, 80)])
    torch.testing.assert_close(scaled[0]["boxes"], dets[0]["boxes"] * 2)


def test_predict_thresholds_and_restores_the_mode(tiny_detr):
    tiny_detr.train()
    images = torch.randn(1, 3, 48, 64)
    everything = predict(tiny_detr, images, 0.0)[0]
    assert tiny_detr.training
    cut = float(everything["scores"][2])
    kept = predict(tiny_detr, images, cut)[0]
    assert len(kept["scores"]) == int((everything["scores"] >= cut).sum()) >= 3
    assert (kept["scores"] >= cut).all()
    assert len(predict(tiny_detr, images, 0.0, max_detections=2)[0]["scores"]) == 2
    assert everything["boxes"].device.type == "cpu" and everything["boxes"].dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images": [], "score_threshold": 0.5}, "no images"),
        ({"images": [torch.zeros(1, 8, 8)], "score_threshold": 0.5}, r"images\[0\] must be a tensor \[3, H, W\]"),
        ({"images": torch.zeros(3, 8, 8), "score_threshold": 0.5}, r"\[B, 3, H, W\]"),
        ({"images": torch.zeros(1, 3, 8, 8), "score_threshold": 1.5}, r"score_threshold must be a number in \[0, 1\]"),
        ({"images": torch.zeros(1, 3, 8, 8), "score_threshold": 0.5, "max_detections": 0}, "max_detections"),
        ({"images": torch.zeros(1, 3, 8, 8), "score_threshold": 0.5, "image_sizes": [(8, 8), (8, 8)]}, "image_sizes"),
    ],
)
def test_predict_rejects_bad_input(tiny_detr, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        predict(tiny_detr, **kwargs)


def test_public_api_names():
    import detr

    assert detr.build_model is build_model and detr.predict is predict
