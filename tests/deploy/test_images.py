"""Request images: base64 and bytes decode to the pixels that were encoded; bad ones are refused."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from deploy.images import ImageLimits, decode_base64_image, decode_image_bytes, encode_png_base64
from detr.errors import InvalidInputError
from tests.deploy.conftest import scene_pixels
from tests.deploy.odd_images import odd_images


def encoded(pixels: np.ndarray, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def test_png_base64_round_trip_is_lossless():
    pixels = scene_pixels(0, 70, 50)
    decoded = decode_base64_image(encode_png_base64(pixels), where="row 0")
    assert decoded.shape == (3, 50, 70)
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), pixels)


def test_jpeg_decodes_like_pil():
    """A JPEG's base64 starts with '/9j/': it must not be taken for a file path."""
    data = encoded(scene_pixels(1, 64, 48), "JPEG", quality=90)
    text = base64.b64encode(data).decode()
    assert text.startswith("/9j/")
    decoded = decode_base64_image(text, where="row 0")
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), reference)


@pytest.mark.parametrize("variant", ["data_url", "urlsafe", "line_breaks"])
def test_base64_spellings(variant):
    pixels = scene_pixels(2, 40, 40)
    data = encoded(pixels, "PNG")
    if variant == "data_url":
        text = "data:image/png;base64," + base64.b64encode(data).decode()
    elif variant == "urlsafe":
        text = base64.urlsafe_b64encode(data).decode()
    else:
        raw = base64.b64encode(data).decode()
        text = "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))
    np.testing.assert_array_equal(decode_base64_image(text, where="r").permute(1, 2, 0).numpy(), pixels)


def test_grayscale_and_alpha_become_rgb():
    gray = np.arange(30 * 20, dtype=np.uint8).reshape(20, 30)
    decoded = decode_image_bytes(encoded(gray, "PNG"), where="g")
    assert decoded.shape == (3, 20, 30)
    np.testing.assert_array_equal(decoded[0].numpy(), gray)
    rgba = np.dstack([scene_pixels(3, 30, 20), np.full((20, 30), 128, np.uint8)])
    assert decode_image_bytes(encoded(rgba, "PNG"), where="a").shape == (3, 20, 30)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://example.com/cat.jpg", "looks like a URL"),
        ("file:///etc/passwd", "looks like a URL"),
        ("/etc/passwd", "not valid base64"),
        ("not base64 at all!", "not valid base64"),
        (base64.b64encode(b"plain text, not an image").decode(), "not an image PIL can read"),
        ("", "empty"),
        (12345, "expected a base64-encoded JPEG or PNG string, got int"),
        (None, "got NoneType"),
    ],
)
def test_bad_values_are_refused_with_the_reason(value, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        decode_base64_image(value, where="row 3, column 'image'")
    assert "row 3, column 'image'" in str(info.value)


def test_truncated_png_is_refused():
    data = encoded(scene_pixels(4, 64, 64), "PNG")
    with pytest.raises(InvalidInputError, match="damaged or truncated|not an image"):
        decode_image_bytes(data[: len(data) // 2], where="upload")


def test_size_limits():
    data = encoded(scene_pixels(5, 64, 64), "PNG")
    with pytest.raises(InvalidInputError, match=f"larger than the limit of {len(data) - 1}"):
        decode_image_bytes(data, where="u", limits=ImageLimits(max_bytes=len(data) - 1))
    with pytest.raises(InvalidInputError, match="larger than the limit"):
        decode_base64_image(base64.b64encode(data).decode(), where="u", limits=ImageLimits(max_bytes=100))
    # A decompression bomb: a few hundred bytes of PNG that would decode to 48 million pixels.
    bomb = encoded(np.zeros((6000, 8000), dtype=bool), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(InvalidInputError, match="8000x6000 pixels, more than the limit of 40000000"):
        decode_image_bytes(bomb, where="u")


@pytest.mark.parametrize("odd", odd_images(), ids=lambda o: o.name)
def test_every_kind_of_image_decodes_as_displayed(odd):
    decoded = decode_image_bytes(odd.data, where=odd.name)
    width, height = odd.size
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, height, width)
    shown = decoded.permute(1, 2, 0).numpy()
    if odd.expected is not None:
        np.testing.assert_array_equal(shown, odd.expected)


def test_cmyk_and_rotated_jpeg_look_like_their_source():
    """Lossy files: close to the scene they were saved from (CMYK), turned the right way (EXIF 6)."""
    scene = scene_pixels(7, 64, 48).astype(np.int32)
    by_name = {o.name: o for o in odd_images()}
    cmyk = decode_image_bytes(by_name["cmyk_jpeg"].data, where="c").permute(1, 2, 0).numpy().astype(np.int32)
    assert np.abs(cmyk - scene).mean() < 8
    rotated = decode_image_bytes(by_name["exif_rotated_jpeg"].data, where="r").permute(1, 2, 0).numpy()
    expected = np.rot90(scene, k=-1)
    assert np.abs(rotated.astype(np.int32) - expected).mean() < 8
    assert np.abs(rotated.astype(np.int32) - np.rot90(scene, k=1)).mean() > 20  # not turned the wrong way
