"""Request images -> RGB pixel tensors, with the limits a server needs.

Images arrive as base64 text (the pyfunc contract: a string column ``image``) or as raw bytes (a
file upload to the REST app). Only the bytes sent are decoded: a string that looks like a URL or a
file path is refused, never fetched or opened. PIL decodes (JPEG, PNG and the other formats it
knows); the encoded size and the pixel count are capped before and while decoding, so one request
cannot exhaust the server's memory.

Every mode PIL decodes becomes 8-bit RGB, as a viewer would show it:

- EXIF orientation is applied first (a phone photo taken upright is detected upright), so boxes and
  ``image_size`` are in the pixels of the image as displayed, not as stored;
- grayscale (``L``, ``1``) is repeated in the three channels; CMYK and YCbCr go through PIL's
  conversion; palette images use their palette;
- transparency (``RGBA``, ``LA``, a palette or ``RGB`` with a transparent colour) is composited
  over white, the background a browser shows it on (dropping alpha would expose whatever colour the
  transparent pixels happen to store, often black);
- 16-bit samples (``I;16`` grayscale PNG/TIFF, and ``I`` holding 0..65535) are scaled by 255/65535;
  float images (``F``) in [0, 1] are scaled by 255, others clipped to [0, 255];
- an animation or a multi-page file gives its first frame.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from detr.data.loader import DECODE_ERRORS
from detr.errors import InvalidInputError

DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024  # encoded size of one image
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # width x height of one decoded image (e.g. 8000 x 5000)
# Images in one request, for both servers (detr serve --max-images, DETR_SERVE_MAX_IMAGES for the
# pyfunc model): bounds what one request holds in memory at once.
DEFAULT_MAX_IMAGES = 16

# A scheme such as http:// (":" never occurs in base64). Paths need no check: they are not base64
# (or decode to bytes that are no image), and nothing here opens a file.
_URL = re.compile(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class ImageLimits:
    """``max_bytes``: encoded size of one image; ``max_pixels``: its width x height once decoded."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def decode_base64_image(text: object, *, where: str, limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """uint8 [3, H, W] RGB pixels of a base64-encoded image (standard or URL-safe alphabet).

    ``where`` names the value in errors, e.g. ``"row 2, column 'image'"``.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"{where}: expected a base64-encoded JPEG or PNG string, got {type(text).__name__}")
    if _URL.match(text) and not text.lstrip().startswith("data:"):
        raise InvalidInputError(
            f"{where}: looks like a URL; send the image's bytes base64-encoded (URLs are never fetched)"
        )
    # base64 inflates by 4/3: refuse an oversized payload before decoding it.
    if len(text) > limits.max_bytes * 4 // 3 + 4:
        raise InvalidInputError(f"{where}: image is larger than the limit of {limits.max_bytes} bytes")
    compact = "".join(text.split())
    if compact.startswith("data:") and "," in compact:  # a data URL: data:image/png;base64,....
        compact = compact.split(",", 1)[1]
    try:
        data = base64.b64decode(compact.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(
            f"{where}: not valid base64 ({e}); send the image file's bytes base64-encoded "
            "(file paths are never opened)"
        ) from None
    return decode_image_bytes(data, where=where, limits=limits)


def decode_image_bytes(data: bytes, *, where: str, limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """uint8 [3, H, W] RGB pixels of an encoded image (any format PIL reads)."""
    if len(data) == 0:
        raise InvalidInputError(f"{where}: the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidInputError(f"{where}: image is {len(data)} bytes, larger than the limit of {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The header gives the size: refuse a decompression bomb before decoding any pixel.
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidInputError(
                    f"{where}: image is {width}x{height} pixels, more than the limit of {limits.max_pixels}"
                )
            pixels = to_rgb_array(image)  # [H, W, 3] uint8
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"{where}: not an image PIL can read (send JPEG, PNG or another common format)") from None
    except DECODE_ERRORS as e:
        raise InvalidInputError(f"{where}: the image is damaged or truncated ({e})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image of any mode, oriented by its EXIF tag (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(image, dtype=np.float64)
        return _gray_to_rgb(np.clip(np.rint(wide * (255 / 65535)), 0, 255).astype(np.uint8))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255
        return _gray_to_rgb(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def encode_png_base64(pixels: np.ndarray | torch.Tensor) -> str:
    """Base64 PNG of uint8 RGB pixels ([H, W, 3] array or [3, H, W] tensor): request examples, tests."""
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
