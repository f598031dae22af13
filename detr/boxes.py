"""Box formats, conversions and checks.

Three box formats appear in this package, each at one place of the pipeline (DESIGN.md "Boxes"):

* ``xyxy`` absolute pixels: records, transforms, postprocessed predictions. ``(x1, y1, x2, y2)``
  with ``0 <= x1 < x2 <= width``; pixel edges, so a box covering pixel columns 3..7 is ``x1=3, x2=8``.
* ``cxcywh`` normalized to [0, 1] by the image size: model targets and ``pred_boxes``.
* ``xywh`` absolute pixels: COCO annotation files only.

The arithmetic is torchvision's (``torchvision.ops``); this module names the conversions and adds
the checks that turn a bad user box into an error naming where it came from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import box_area, box_convert, box_iou, clip_boxes_to_image, generalized_box_iou

from detr.errors import DatasetFormatError

__all__ = [
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "cxcywh_to_xyxy",
    "degenerate_mask",
    "generalized_box_iou",
    "outside_image_mask",
    "validate_boxes",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (cx, cy, w, h), same units."""
    return _convert(boxes, "xyxy", "cxcywh")


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2), same units."""
    return _convert(boxes, "cxcywh", "xyxy")


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] COCO (x, y, w, h) -> [..., 4] (x1, y1, x2, y2)."""
    return _convert(boxes, "xywh", "xyxy")


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] COCO (x, y, w, h)."""
    return _convert(boxes, "xyxy", "xywh")


def _convert(boxes: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    # torchvision's box_convert takes [N, 4]; predictions come as [B, Q, 4], so flatten the leading dims.
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have a last dimension of 4, got shape {tuple(boxes.shape)}")
    flat = boxes.reshape(-1, 4)
    return box_convert(flat, in_fmt=in_fmt, out_fmt=out_fmt).reshape(boxes.shape)


def degenerate_mask(boxes: np.ndarray | torch.Tensor) -> np.ndarray:
    """bool [N]: boxes with zero or negative width or height (x2 <= x1 or y2 <= y1), or not finite."""
    b = _as_numpy(boxes)
    finite = np.isfinite(b).all(axis=1)
    with np.errstate(invalid="ignore"):
        return ~finite | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])


def outside_image_mask(
    boxes: np.ndarray | torch.Tensor, width: float, height: float, tolerance: float = 0.0
) -> np.ndarray:
    """bool [N]: xyxy boxes that extend more than ``tolerance`` pixels beyond the image."""
    b = _as_numpy(boxes)
    with np.errstate(invalid="ignore"):
        return (
            (b[:, 0] < -tolerance)
            | (b[:, 1] < -tolerance)
            | (b[:, 2] > width + tolerance)
            | (b[:, 3] > height + tolerance)
        )


def validate_boxes(
    boxes: np.ndarray | torch.Tensor,
    width: float,
    height: float,
    *,
    where: str,
    box_sources: Sequence[str] | None = None,
) -> None:
    """Raise :class:`DatasetFormatError` for the first degenerate or out-of-image xyxy box.

    ``where`` names the image (file or record source); ``box_sources`` (one per box), when given,
    names the exact annotation so the user can find and fix it.
    """
    b = _as_numpy(boxes)
    for kind, bad in (
        ("has zero or negative size (x2 <= x1 or y2 <= y1) or is not finite", degenerate_mask(b)),
        (f"lies outside the {width:g}x{height:g} image", outside_image_mask(b, width, height)),
    ):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            origin = box_sources[i] if box_sources is not None else f"{where}: box {i}"
            raise DatasetFormatError(
                f"{origin}: box (x1, y1, x2, y2) = {_fmt_box(b[i])} {kind}; "
                f"{int(bad.sum())} such box(es) in {where}; boxes must satisfy "
                f"0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height"
            )


def _as_numpy(boxes: np.ndarray | torch.Tensor) -> np.ndarray:
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {b.shape}")
    return b


def _fmt_box(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box.tolist()) + ")"
