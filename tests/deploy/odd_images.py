"""Encoded images of every kind a client may send, each with the pixels a viewer would show.

Shared by the decoding tests and the tests of both servers and ``detr predict``: strips of extreme
aspect ratio, grayscale, 16-bit, CMYK, RGBA, palette with transparency, and a photo whose EXIF tag
says it must be rotated for display.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tests.deploy.conftest import scene_pixels

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class OddImage:
    name: str
    data: bytes  # the file's bytes
    suffix: str  # file name extension
    size: tuple[int, int]  # (width, height) as displayed
    expected: np.ndarray | None  # uint8 [H, W, 3] as displayed; None for lossy or converted formats


def _save(image: Image.Image, fmt: str, **args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **args)
    return buffer.getvalue()


def _strip(width: int, height: int) -> OddImage:
    pixels = np.random.default_rng(width * 7 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return OddImage(f"strip_{width}x{height}", _save(Image.fromarray(pixels), "PNG"), ".png", (width, height), pixels)


def odd_images() -> list[OddImage]:
    scene = scene_pixels(7, 64, 48)  # [48, 64, 3]
    gray = scene.mean(axis=2).astype(np.uint8)
    gray16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    gray16_shown = np.rint(gray16.astype(np.float64) * 255 / 65535).astype(np.uint8)

    alpha = np.zeros((48, 64), np.uint8)
    alpha[:, 32:] = 255  # left half transparent (its colour channels hold the scene: must not show)
    rgba = np.dstack([scene, alpha])
    rgba_shown = scene.copy()
    rgba_shown[:, :32] = 255

    palette_image = Image.fromarray(scene).quantize(colors=8)
    palette_image.info["transparency"] = 0  # palette entry 0 is transparent
    indices = np.asarray(palette_image)
    colours = np.asarray(palette_image.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    palette_shown = colours[indices]
    palette_shown[indices == 0] = 255

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored landscape; displayed after a quarter turn clockwise
    rotated_shown = np.ascontiguousarray(np.rot90(scene, k=-1))  # [64, 48, 3]

    cmyk = Image.fromarray(scene).convert("CMYK")
    return [
        _strip(1000, 1), _strip(1, 1000), _strip(500, 2), _strip(1, 1), _strip(4000, 3),
        OddImage("grayscale", _save(Image.fromarray(gray), "PNG"), ".png", (64, 48), np.dstack([gray] * 3)),
        OddImage("gray16", _save(Image.fromarray(gray16), "PNG"), ".png", (64, 48), np.dstack([gray16_shown] * 3)),
        OddImage("gray16_tiff", _save(Image.fromarray(gray16), "TIFF"), ".tif", (64, 48),
                 np.dstack([gray16_shown] * 3)),
        OddImage("rgba", _save(Image.fromarray(rgba), "PNG"), ".png", (64, 48), rgba_shown),
        OddImage("palette", _save(palette_image, "PNG", transparency=0), ".png", (64, 48), palette_shown),
        OddImage("cmyk_jpeg", _save(cmyk, "JPEG", quality=95), ".jpg", (64, 48), None),
        OddImage("exif_rotated_png", _save(Image.fromarray(scene), "PNG", exif=exif.tobytes()), ".png", (48, 64),
                 rotated_shown),
        OddImage("exif_rotated_jpeg", _save(Image.fromarray(scene), "JPEG", quality=95, exif=exif.tobytes()),
                 ".jpg", (48, 64), None),
    ]
