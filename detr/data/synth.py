"""The generated shapes dataset: the embedded default for trying the whole pipeline on a laptop.

Each image has a cluttered background (a colour gradient, low-frequency blotches, sensor grain and
thin distractor strokes that are not objects) and 1-6 shapes of six classes (:data:`CLASSES`),
in random colours (colour says nothing about the class), sizes from small to large (about 24-160 px
at 320x320, log-uniform), random rotations, sometimes crossing the image border and sometimes
hiding each other. Annotations follow real datasets:

* the box is the tight box of the shape's drawn pixels inside the image, before occlusion (a partly
  hidden object keeps its full extent, a truncated one is clipped to the image);
* ``truncated`` = fraction of the shape's pixels outside the image (KITTI's 0..1);
* ``occluded`` = KITTI level from the fraction of its in-image pixels hidden by later shapes:
  0 fully visible (< 5 % hidden), 1 partly occluded (< 40 %), 2 largely occluded (at most 65 %:
  a placement that would hide more is drawn again). KITTI's 3 ("unknown") never occurs;
* ``difficult`` (VOC) for tiny boxes (a side under 12 px) or shapes with less than 40 % of their
  pixels visible; ``iscrowd`` is always false.

Each format gets the attributes it has a field for: COCO ``iscrowd``; VOC ``difficult`` and the
0/1 flags ``occluded`` (level > 0) and ``truncated`` (fraction > 0); KITTI the levels and
fractions; YOLO none. So writing the dataset drops nothing silently and warns about nothing.

Generation is deterministic: image ``i`` of seed ``s`` depends only on ``(s, i)``, so the same seed
gives byte-identical annotation files and identical pixels (PNG, lossless), and a larger dataset
starts with the images of a smaller one.
"""

from __future__ import annotations

import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from detr.data.dataset import DetectionDataset
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.synth_scene import CLASSES, Scene, render_scene
from detr.errors import InvalidInputError

__all__ = ["CLASSES", "FORMATS", "generate_synthetic_dataset", "render_scene", "synthetic_dataset"]

FORMATS = ("coco", "voc", "yolo", "kitti")
MAX_PENDING = 8  # rendered images waiting for the PNG encoder threads


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def label_map() -> LabelMap:
    return LabelMap(CLASSES)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of how many images are made."""
    return np.random.default_rng([seed, index])


def generate_records(
    image_dir: str | Path,
    indices: range,
    *,
    seed: int,
    image_size: tuple[int, int],
    progress: bool = True,
) -> list[ImageRecord]:
    """Render images ``indices`` as ``<image_dir>/<index:06d>.png`` and return their records."""
    width, height = image_size
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    # PNG encoding (zlib, GIL released) runs on two threads while the next scene is drawn.
    # At most MAX_PENDING images wait in memory; result() re-raises a failed write (disk full).
    with ThreadPoolExecutor(max_workers=2) as encoder:
        pending: deque[Future] = deque()
        for index in tqdm(
            indices, desc="synth images", unit="img", disable=None if progress else True, leave=False
        ):
            scene = render_scene(image_rng(seed, index), width, height)
            path = (image_dir / f"{index:06d}.png").absolute()
            pending.append(encoder.submit(_save_png, scene.image, path))
            records.append(_record(scene, path, seed, index))
            while len(pending) > MAX_PENDING:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    return records


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def _record(scene: Scene, path: Path, seed: int, index: int) -> ImageRecord:
    height, width = scene.image.shape[:2]
    source = f"synth seed={seed} image {index}"
    return ImageRecord(
        image_path=path,
        width=width,
        height=height,
        boxes=scene.boxes,
        labels=scene.labels,
        box_sources=tuple(f"{source} object {k}" for k in range(len(scene.labels))),
        source=source,
        image_id=index + 1,  # COCO-style positive integer ids, unique across splits
        attributes=scene.attributes,
    )


def split_sizes(num_images: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) image counts: val gets round(n * fraction), at least 1 when the fraction is
    positive, and train keeps at least one image."""
    if val_fraction == 0 or num_images < 2:
        return num_images, 0
    num_val = min(max(1, round(num_images * val_fraction)), num_images - 1)
    return num_images - num_val, num_val


def synthetic_dataset(
    image_dir: str | Path,
    num_images: int,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 320),
    start: int = 0,
    name: str = "synth",
    progress: bool = True,
) -> DetectionDataset:
    """An in-memory dataset of images ``start .. start + num_images - 1`` (PNG files in ``image_dir``)."""
    _check_arguments(num_images, seed, image_size, 0.0)
    records = generate_records(
        image_dir, range(start, start + num_images), seed=seed, image_size=image_size, progress=progress
    )
    return DetectionDataset(tuple(records), label_map(), name, "synth")


def generate_synthetic_dataset(
    out: str | Path,
    format: str = "coco",
    num_images: int = 200,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 320),
    val_fraction: float = 0.2,
    *,
    progress: bool = True,
) -> Path:
    """Write the shapes dataset to ``out`` in ``format`` with a ``train`` and (if any) ``val`` split.

    ``image_size`` is (width, height). The first images go to train, the last
    ``round(num_images * val_fraction)`` to val. Returns ``out``.
    """
    from detr.data.formats import write_dataset  # the writers import this package's dataset module

    if format not in FORMATS:
        raise InvalidInputError(f"format {format!r}: expected one of {list(FORMATS)}")
    _check_arguments(num_images, seed, image_size, val_fraction)
    out = Path(out)
    num_train, num_val = split_sizes(num_images, val_fraction)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"{out} exists and is not an empty directory; choose a new output directory")
    staging = out / ".synth-images"
    try:
        for split, start, count in (("train", 0, num_train), ("val", num_train, num_val)):
            if count == 0:
                continue
            dataset = synthetic_dataset(
                staging / split,
                count,
                seed=seed,
                image_size=image_size,
                start=start,
                name=f"synth-{split}",
                progress=progress,
            )
            write_dataset(_attributes_for(dataset, format), out, format, split=split, images="copy")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _attributes_for(dataset: DetectionDataset, format: str) -> DetectionDataset:
    """The attributes ``format`` carries, in its own terms (VOC: 0/1 flags; COCO: iscrowd only)."""

    def convert(attributes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if format == "coco":
            return {"iscrowd": attributes["iscrowd"]}
        if format == "voc":
            return {
                "difficult": attributes["difficult"],
                "occluded": (attributes["occluded"] > 0).astype(np.int64),
                "truncated": (attributes["truncated"] > 0).astype(np.float32),
            }
        if format == "kitti":
            return {"occluded": attributes["occluded"], "truncated": attributes["truncated"]}
        return {}  # YOLO has no per-box attributes

    records = tuple(replace(r, attributes=convert(r.attributes)) for r in dataset.records)
    return replace(dataset, records=records)


def _check_arguments(num_images: int, seed: int, image_size: tuple[int, int], val_fraction: float) -> None:
    if not isinstance(num_images, int) or num_images < 1:
        raise InvalidInputError(f"num_images={num_images!r}: expected a positive integer")
    if not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"seed={seed!r}: expected a non-negative integer")
    if len(image_size) != 2 or any(not isinstance(v, int) or v < 32 for v in image_size):
        raise InvalidInputError(
            f"image_size={image_size!r}: expected (width, height), each at least 32 pixels"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInputError(f"val_fraction={val_fraction!r}: expected a number in [0, 1)")
