"""Model inputs: the checks every forward makes and padding a list of images into one batch.

Batches are padded at the bottom and right; the mask is True on padding. Box targets and predictions
are normalized by the unpadded image size, so padding never moves a box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from detr.errors import InvalidInputError


def check_model_inputs(images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """Check ``images`` [B, 3, H, W] (floating) and ``masks`` [B, H, W] (bool); return the mask
    (all False, i.e. no padding, when ``masks`` is None)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(f"images must be a tensor [B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise InvalidInputError(f"images must be a normalized floating-point tensor, got dtype {images.dtype}")
    b, _, h, w = images.shape
    if masks is None:
        return torch.zeros((b, h, w), dtype=torch.bool, device=images.device)
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or tuple(masks.shape) != (b, h, w):
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise InvalidInputError(f"masks must be a bool tensor [B, H, W] = [{b}, {h}, {w}] (True = padding), got {got}")
    return masks


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad images [3, H_i, W_i] to one batch [B, 3, max H, max W] (zeros at the bottom/right) and
    return it with the padding mask [B, max H, max W] (True = padding)."""
    if len(images) == 0:
        raise InvalidInputError("no images given: expected at least one [3, H, W] tensor")
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InvalidInputError(f"images[{i}] must be a tensor [3, H, W], got {shape}")
    height = max(int(image.shape[1]) for image in images)
    width = max(int(image.shape[2]) for image in images)
    first = images[0]
    batch = first.new_zeros((len(images), 3, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        batch[i, :, :h, :w].copy_(image)
        mask[i, :h, :w] = False
    return batch, mask
