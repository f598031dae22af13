"""The one data -> model box step: known values, round trip, batched sizes."""

from __future__ import annotations

import torch

from detr.data.targets import from_model_boxes, to_model_targets


def test_known_values():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0]])  # xyxy pixels
    # image H=100, W=200: cx = 30/200, cy = 40/100, w = 40/200, h = 40/100; the full image is centred
    expected = torch.tensor([[0.15, 0.40, 0.20, 0.40], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(to_model_targets(boxes, (100, 200)), expected)
    torch.testing.assert_close(from_model_boxes(expected, (100, 200)), boxes)


def test_round_trip_random_boxes():
    generator = torch.Generator().manual_seed(1)
    corner = torch.rand(50, 2, generator=generator) * torch.tensor([300.0, 200.0])
    size = torch.rand(50, 2, generator=generator) * 40 + 1
    boxes = torch.cat([corner, corner + size], dim=1)
    targets = to_model_targets(boxes, torch.tensor([240, 340]))
    assert targets.dtype == torch.float32
    assert (targets[:, 2:] > 0).all()
    torch.testing.assert_close(from_model_boxes(targets, (240, 340)), boxes)


def test_batched_sizes_match_per_image_calls():
    generator = torch.Generator().manual_seed(2)
    boxes = torch.rand(3, 5, 4, generator=generator)  # [B, Q, 4] normalized cxcywh
    sizes = torch.tensor([[100, 200], [64, 48], [480, 640]])  # [B, 2] (H, W)
    batched = from_model_boxes(boxes, sizes)
    for i in range(3):
        torch.testing.assert_close(batched[i], from_model_boxes(boxes[i], tuple(sizes[i].tolist())))
    torch.testing.assert_close(to_model_targets(batched, sizes), boxes)


def test_empty_and_integer_boxes():
    assert to_model_targets(torch.zeros(0, 4), (10, 10)).shape == (0, 4)
    integer = to_model_targets(torch.tensor([[0, 0, 10, 5]]), (10, 20))
    torch.testing.assert_close(integer, torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
