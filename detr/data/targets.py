"""The one step between data boxes and model boxes.

The data layer speaks xyxy absolute pixels (records, transforms); DETR predicts and is trained on
(cx, cy, w, h) normalized by the size of the image it sees (after transforms, before padding). The
conversion happens here and nowhere else: the loader calls :func:`to_model_targets` on the
transformed boxes, and postprocess calls :func:`from_model_boxes` with the original image size, so
predictions come out in pixels of the original image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from detr.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh

ImageSize = Sequence[int] | torch.Tensor  # (H, W), or a [B, 2] tensor of (H, W) rows


def to_model_targets(boxes_xyxy: torch.Tensor, image_size: ImageSize) -> torch.Tensor:
    """[..., 4] xyxy pixels of an image of ``image_size`` (H, W) -> [..., 4] normalized cxcywh.

    With a [B, 2] ``image_size`` the boxes are [B, N, 4], one size per image.
    """
    scale = _whwh(image_size, boxes_xyxy)
    return xyxy_to_cxcywh(boxes_xyxy.float()) / scale


def from_model_boxes(boxes_cxcywh: torch.Tensor, image_size: ImageSize) -> torch.Tensor:
    """Inverse of :func:`to_model_targets`: [..., 4] normalized cxcywh -> [..., 4] xyxy pixels."""
    scale = _whwh(image_size, boxes_cxcywh)
    return cxcywh_to_xyxy(boxes_cxcywh.float()) * scale


def _whwh(image_size: ImageSize, boxes: torch.Tensor) -> torch.Tensor:
    """The (W, H, W, H) scale, shaped to broadcast against ``boxes``."""
    size = torch.as_tensor(image_size, dtype=torch.float32, device=boxes.device)
    if size.shape[-1] != 2:
        raise ValueError(f"image_size must be (H, W) or [B, 2], got shape {tuple(size.shape)}")
    height, width = size.unbind(-1)
    scale = torch.stack([width, height, width, height], dim=-1)  # [..., 4]
    if scale.dim() > 1:  # [B, 4] per-image sizes against [B, N, 4] boxes
        scale = scale.unsqueeze(-2)
    return scale
