"""Box conversions against hand-computed values and round trips; user-box checks name the box."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detr.boxes import (
    cxcywh_to_xyxy,
    degenerate_mask,
    outside_image_mask,
    validate_boxes,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from detr.errors import DatasetFormatError

XYXY = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 1.0, 3.0]])
CXCYWH = torch.tensor([[30.0, 40.0, 40.0, 40.0], [0.5, 1.5, 1.0, 3.0]])
XYWH = torch.tensor([[10.0, 20.0, 40.0, 40.0], [0.0, 0.0, 1.0, 3.0]])


def test_known_values():
    torch.testing.assert_close(xyxy_to_cxcywh(XYXY), CXCYWH)
    torch.testing.assert_close(cxcywh_to_xyxy(CXCYWH), XYXY)
    torch.testing.assert_close(xyxy_to_xywh(XYXY), XYWH)
    torch.testing.assert_close(xywh_to_xyxy(XYWH), XYXY)


def test_round_trips_and_leading_dims():
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(2, 7, 2, generator=generator) * 100
    size = torch.rand(2, 7, 2, generator=generator) * 50 + 0.1
    boxes = torch.cat([corner, corner + size], dim=-1)  # [B, Q, 4]
    converted = xyxy_to_cxcywh(boxes)
    assert converted.shape == (2, 7, 4)
    # independent formula
    expected = torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], dim=-1)
    torch.testing.assert_close(converted, expected)
    torch.testing.assert_close(cxcywh_to_xyxy(converted), boxes)
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(boxes)), boxes)


def test_empty_boxes():
    assert xyxy_to_cxcywh(torch.zeros(0, 4)).shape == (0, 4)
    assert degenerate_mask(np.zeros((0, 4), np.float32)).shape == (0,)


def test_wrong_last_dim_is_rejected():
    with pytest.raises(ValueError, match="last dimension of 4"):
        xyxy_to_cxcywh(torch.zeros(3, 5))


def test_degenerate_and_outside_masks():
    boxes = np.array(
        [[0, 0, 10, 10], [5, 5, 5, 9], [6, 6, 4, 9], [0, 0, np.nan, 3], [-2, 0, 4, 4], [0, 0, 21, 10]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(degenerate_mask(boxes), [False, True, True, True, False, False])
    np.testing.assert_array_equal(outside_image_mask(boxes, 20, 10), [False, False, False, False, True, True])
    np.testing.assert_array_equal(outside_image_mask(boxes, 20, 10, tolerance=2), [False] * 6)
    np.testing.assert_array_equal(degenerate_mask(torch.from_numpy(boxes)), degenerate_mask(boxes))


def test_validate_boxes_names_the_box():
    good = np.array([[0, 0, 20, 10], [3, 4, 5, 6]], dtype=np.float32)
    validate_boxes(good, 20, 10, where="a.json")
    bad = np.array([[0, 0, 20, 10], [3, 4, 2, 6]], dtype=np.float32)
    with pytest.raises(
        DatasetFormatError, match=r"ann\.json: annotations\[7\].*\(3, 4, 2, 6\).*zero or negative"
    ):
        validate_boxes(
            bad,
            20,
            10,
            where="ann.json",
            box_sources=["ann.json: annotations[6]", "ann.json: annotations[7]"],
        )
    outside = np.array([[0, 0, 25, 10]], dtype=np.float32)
    with pytest.raises(DatasetFormatError, match=r"img\.xml: box 0.*outside the 20x10 image"):
        validate_boxes(outside, 20, 10, where="img.xml")
