"""Images for people to look at: a picture with boxes, scaled to a readable size, and a caption band.

A caption says what the picture shows and how to read it (the score threshold, what went wrong),
so an image logged to MLflow explains itself: a picture with ground truth only and no word on why
the predictions are missing is the thing this module exists to prevent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as TF

CAPTION_BACKGROUND = (32, 32, 32)
CAPTION_TEXT = (240, 240, 240)
SMALL_SIDE = 320  # images with a longer side below this are enlarged (by an integer factor)
LARGE_SIDE = 640  # and above this reduced: readable in the MLflow UI, small on disk


def display_scale(width: int, height: int) -> float:
    """The factor that brings an image's longer side into [SMALL_SIDE, LARGE_SIDE] where it can."""
    side = max(width, height, 1)
    if side < SMALL_SIDE:
        return float(-(-SMALL_SIDE // side))  # ceil: 160 -> 2
    return min(1.0, LARGE_SIDE / side)


def scale_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 [3, H, W] resized by ``scale`` (antialiased); identity for 1."""
    if scale == 1.0:
        return image
    height, width = image.shape[-2:]
    return TF.resize(image, [max(1, round(height * scale)), max(1, round(width * scale))], antialias=True)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font when Pillow has FreeType
    except TypeError:  # Pillow < 10.1 takes no size
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split(" "):
        trial = f"{current} {word}" if current else word
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current]


def add_caption(image: torch.Tensor | np.ndarray, lines: Sequence[str], *, font_size: int = 12) -> np.ndarray:
    """uint8 [H + band, W, 3]: ``image`` ([3, H, W] tensor or [H, W, 3] array) above a dark band
    holding ``lines``, each wrapped to the image width."""
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(np.ascontiguousarray(image))
    font = _font(font_size)
    measure = ImageDraw.Draw(picture)
    margin = 4
    wrapped = [part for line in lines for part in _wrap(measure, line, font, picture.width - 2 * margin)]
    line_height = font_size + 3
    band = margin * 2 + line_height * len(wrapped)
    canvas = Image.new("RGB", (picture.width, picture.height + band), CAPTION_BACKGROUND)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped):
        draw.text((margin, picture.height + margin + i * line_height), line, fill=CAPTION_TEXT, font=font)
    return np.asarray(canvas)
