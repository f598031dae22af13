"""Drawing one image of the shapes dataset and computing its ground truth.

The rules (what a box, ``truncated``, ``occluded`` and ``difficult`` mean) are described in
:mod:`detr.data.synth`; this module only draws and measures. Everything random comes from the
``numpy.random.Generator`` passed in, so a scene is a pure function of that generator's seed.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
MAX_OBJECTS = 6
SIZE_RANGE_AT_320 = (24.0, 160.0)  # shape extent in pixels for a 320-pixel short side
MIN_SIZE_PX = 8.0
BORDER_PROBABILITY = 0.2  # chance that a shape is placed across the image border
MIN_IN_IMAGE = 0.35  # a truncated shape keeps at least this fraction of its pixels in the image
MAX_HIDDEN = 0.65  # a new shape may hide at most this fraction of an earlier one
OCCLUSION_LEVELS = (0.05, 0.40)  # hidden-fraction thresholds of KITTI levels 1 and 2
DIFFICULT_MIN_SIDE = 12.0
DIFFICULT_MIN_VISIBLE = 0.40
NOISE_AMPLITUDE = 4  # sensor grain: uniform noise in [-4, 4] grey levels
GRID = 6  # background blotches: a GRID x GRID coarse field upsampled to the image
PLACEMENT_TRIES = 25

FILL, OUTLINE = 1, 2  # values of a shape's local label canvas (0 = not part of the shape)


@dataclass(frozen=True)
class Scene:
    """One rendered image and its ground truth.

    ``image`` uint8 [H, W, 3]; ``boxes`` float32 [N, 4] xyxy pixels; ``labels`` int64 [N];
    ``masks`` bool [N, H, W] in-image drawn pixels of each shape before occlusion; ``visible`` bool
    [N, H, W] the pixels of each shape in the final image; ``colours`` uint8 [N, 2, 3] fill and rim
    colour of each shape; ``attributes`` name -> [N] (records.py).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    visible: np.ndarray
    colours: np.ndarray
    attributes: dict[str, np.ndarray]


@dataclass
class _Shape:
    label: int
    canvas: np.ndarray  # uint8 [S, S] FILL/OUTLINE/0, the whole shape
    top: int  # image row of canvas row 0
    left: int
    colour: np.ndarray  # uint8 [3]
    outline_colour: np.ndarray  # uint8 [3], a darker rim
    mask: np.ndarray  # bool [H, W] in-image pixels
    full_area: int


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------


def _polygon(radii: list[float], angle: float, centre: float) -> list[tuple[float, float]]:
    """Vertices at the given radii, evenly spaced in angle starting at ``angle``."""
    n = len(radii)
    return [
        (
            centre + r * math.cos(angle + 2 * math.pi * k / n),
            centre + r * math.sin(angle + 2 * math.pi * k / n),
        )
        for k, r in enumerate(radii)
    ]


def _draw_shape(label: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 [S, S] canvas with the shape of class ``label`` and extent about ``size`` pixels."""
    side = int(math.ceil(1.3 * size)) + 4
    c = side / 2.0
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    angle = float(rng.uniform(0, 2 * math.pi))
    width = max(1, round(size / 20))
    outline = OUTLINE if rng.random() < 0.5 else FILL  # half the shapes get a darker rim
    name = CLASSES[label]
    r = size / 2.0
    if name in ("circle", "ring"):
        draw.ellipse([c - r, c - r, c + r, c + r], fill=FILL, outline=outline, width=width)
        if name == "ring":
            inner = r * float(rng.uniform(0.5, 0.65))
            draw.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0, outline=outline, width=width)
    elif name == "square":
        draw.polygon(_polygon([0.62 * size] * 4, angle, c), fill=FILL, outline=outline, width=width)
    elif name == "triangle":
        draw.polygon(_polygon([0.6 * size] * 3, angle, c), fill=FILL, outline=outline, width=width)
    elif name == "star":
        draw.polygon(
            _polygon([0.55 * size, 0.22 * size] * 5, angle, c), fill=FILL, outline=outline, width=width
        )
    else:  # cross: two bars of a third of the extent in thickness
        half_len, half_thick = r, size / 6.0
        for theta in (angle, angle + math.pi / 2):
            u = (math.cos(theta), math.sin(theta))
            v = (-u[1], u[0])
            corners = [
                (
                    c + a * half_len * u[0] + b * half_thick * v[0],
                    c + a * half_len * u[1] + b * half_thick * v[1],
                )
                for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))
            ]
            draw.polygon(corners, fill=FILL, outline=outline, width=width)
    return np.asarray(canvas)


def _random_colour(
    rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]
) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, dtype=np.float32) * 255.0


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Muted gradient with low-frequency blotches, plus distractor strokes (lines and arcs)."""
    start = _random_colour(rng, (0.0, 0.35), (0.25, 0.85))
    end = _random_colour(rng, (0.0, 0.35), (0.25, 0.85))
    theta = rng.uniform(0, 2 * math.pi)
    # A coarse grid holding the gradient plus blotch noise, upsampled bilinearly: a linear
    # gradient stays exactly linear and the noise becomes smooth blotches (and it is fast).
    grid = np.linspace(0.0, 1.0, GRID)
    t = grid[None, :] * math.cos(theta) + grid[:, None] * math.sin(theta)
    t = (t - t.min()) / (t.max() - t.min())
    coarse = start + (end - start) * t[..., None] + rng.normal(0, 20, (GRID, GRID, 3))
    coarse_image = Image.fromarray(np.clip(np.rint(coarse), 0, 255).astype(np.uint8))
    canvas = coarse_image.resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 15))):
        colour = tuple(int(v) for v in _random_colour(rng, (0.0, 0.8), (0.1, 1.0)))
        x0, x1 = rng.uniform(-0.1, 1.1, 2) * width
        y0, y1 = rng.uniform(-0.1, 1.1, 2) * height
        stroke = int(rng.integers(1, 4))
        if rng.random() < 0.6:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=stroke)
        else:
            start_deg = float(rng.uniform(0, 360))
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2]
            draw.arc(
                box, start_deg, start_deg + float(rng.uniform(40, 200)), fill=colour, width=min(stroke, 2)
            )
    return canvas


def _clip_region(
    shape_side: int, top: int, left: int, width: int, height: int
) -> tuple[slice, slice, slice, slice]:
    """(image rows, image cols, canvas rows, canvas cols) of a canvas at (top, left), cut to the image."""
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = max(min(top + shape_side, height), y0), max(min(left + shape_side, width), x0)
    return slice(y0, y1), slice(x0, x1), slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)


def _in_image_mask(canvas: np.ndarray, top: int, left: int, width: int, height: int) -> np.ndarray:
    """bool [H, W]: the canvas placed with its corner at (top, left), cut to the image."""
    mask = np.zeros((height, width), dtype=bool)
    rows, cols, canvas_rows, canvas_cols = _clip_region(canvas.shape[0], top, left, width, height)
    mask[rows, cols] = canvas[canvas_rows, canvas_cols] > 0
    return mask


def _place_shape(rng: np.random.Generator, width: int, height: int, placed: list[_Shape]) -> _Shape | None:
    """A random shape that keeps the scene valid (limits on truncation and occlusion), or None."""
    scale = min(width, height) / 320.0
    low = max(MIN_SIZE_PX, SIZE_RANGE_AT_320[0] * scale)
    high = max(low + 1.0, min(SIZE_RANGE_AT_320[1] * scale, 0.9 * min(width, height)))
    for _ in range(PLACEMENT_TRIES):
        label = int(rng.integers(len(CLASSES)))
        size = float(math.exp(rng.uniform(math.log(low), math.log(high))))
        canvas = _draw_shape(label, size, rng)
        if rng.random() < BORDER_PROBABILITY:
            cx, cy = _border_centre(rng, size, width, height)
        else:
            margin = 0.62 * size  # the largest shape radius: the shape lies inside the image
            cx = rng.uniform(margin, max(width - margin, margin + 1))
            cy = rng.uniform(margin, max(height - margin, margin + 1))
        side = canvas.shape[0]
        top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
        colour = _random_colour(rng, (0.45, 1.0), (0.45, 1.0))
        mask = _in_image_mask(canvas, top, left, width, height)
        full_area = int(np.count_nonzero(canvas))
        in_image = int(np.count_nonzero(mask))
        if in_image < MIN_IN_IMAGE * full_area:
            continue
        x1, y1, x2, y2 = _mask_box(mask)
        if min(x2 - x1, y2 - y1) < 6:
            continue
        if any(
            _hidden_fraction(p.mask, [q.mask for q in placed[i + 1 :]] + [mask]) > MAX_HIDDEN
            for i, p in enumerate(placed)
        ):
            continue
        return _Shape(
            label,
            canvas,
            top,
            left,
            np.rint(colour).astype(np.uint8),
            np.rint(colour * 0.55).astype(np.uint8),
            mask,
            full_area,
        )
    return None


def _border_centre(rng: np.random.Generator, size: float, width: int, height: int) -> tuple[float, float]:
    """A centre within 0.3 ``size`` of a random image edge, anywhere along it: the shape is cut."""
    offset = rng.uniform(-0.3, 0.3) * size
    if rng.random() < 0.5:  # top or bottom edge
        return rng.uniform(0, width), offset + (height if rng.random() < 0.5 else 0)
    return offset + (width if rng.random() < 0.5 else 0), rng.uniform(0, height)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x1, y1, x2, y2) of a non-empty bool [H, W] mask, in pixel edges (x2, y2 exclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _hidden_fraction(mask: np.ndarray, above: list[np.ndarray]) -> float:
    """Fraction of ``mask`` covered by any of the masks drawn ``above`` it."""
    covered = np.zeros_like(mask)
    for other in above:
        covered |= other
    return float(np.count_nonzero(mask & covered)) / max(int(np.count_nonzero(mask)), 1)


def render_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    """Draw one image with 1-6 shapes and compute its boxes and attributes."""
    background = _background(rng, width, height)
    shapes: list[_Shape] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        shape = _place_shape(rng, width, height, shapes)
        if shape is not None:
            shapes.append(shape)
    image = np.array(background, dtype=np.uint8)  # [H, W, 3], writable copy
    for shape in shapes:  # painter's order: later shapes hide earlier ones
        rows, cols, canvas_rows, canvas_cols = _clip_region(
            shape.canvas.shape[0], shape.top, shape.left, width, height
        )
        local = shape.canvas[canvas_rows, canvas_cols]
        region = image[rows, cols]
        region[local == FILL] = shape.colour
        region[local == OUTLINE] = shape.outline_colour
    # Sensor grain: uniform noise on 2x2 pixel cells (per-pixel noise would triple the PNG size).
    cells = rng.integers(
        -NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, ((height + 1) // 2, (width + 1) // 2, 3), dtype=np.int16
    )
    noise = cells.repeat(2, axis=0).repeat(2, axis=1)[:height, :width]
    image = np.clip(image + noise, 0, 255).astype(np.uint8)

    n = len(shapes)
    masks = np.stack([s.mask for s in shapes]) if n else np.zeros((0, height, width), bool)
    visible = masks.copy()
    for i in range(n):
        for j in range(i + 1, n):
            visible[i] &= ~masks[j]
    boxes = np.zeros((n, 4), dtype=np.float32)
    attributes = {
        "iscrowd": np.zeros(n, dtype=np.bool_),
        "difficult": np.zeros(n, dtype=np.bool_),
        "occluded": np.zeros(n, dtype=np.int64),
        "truncated": np.zeros(n, dtype=np.float32),
    }
    for i, shape in enumerate(shapes):
        boxes[i] = _mask_box(shape.mask)
        in_image = int(np.count_nonzero(shape.mask))
        hidden = 1.0 - np.count_nonzero(visible[i]) / in_image
        attributes["occluded"][i] = int(np.searchsorted(OCCLUSION_LEVELS, hidden, side="right"))
        attributes["truncated"][i] = round(1.0 - in_image / shape.full_area, 2)
        visible_fraction = np.count_nonzero(visible[i]) / shape.full_area
        small = min(boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]) < DIFFICULT_MIN_SIDE
        attributes["difficult"][i] = small or visible_fraction < DIFFICULT_MIN_VISIBLE
    labels = np.array([s.label for s in shapes], dtype=np.int64)
    colours = np.array([(s.colour, s.outline_colour) for s in shapes], dtype=np.uint8).reshape(n, 2, 3)
    return Scene(image, boxes, labels, masks, visible, colours, attributes)
