"""Our COCO reader vs ``pycocotools.coco.COCO`` on the same 100k-annotation file.

Writes a synthetic COCO detection JSON (10k images x 10 boxes, each with a polygon segmentation
and area, like real COCO annotations; no image files, so ours runs with ``check_images=False``) to a
temporary directory, then times each reader, best of 3 rounds (the two interleaved, the heap
collected before each call, the result freed after the clock stops):

* ours: ``detr.data.load_dataset(path, check_images=False)`` - parse, validate every box, build
  one record per image;
* reference: ``pycocotools.coco.COCO(path)`` - parse and index.

Prints both and the ratio; exits with status 1 if ours is slower.

    python bench/coco_read.py [--images 10000] [--boxes 10]

Result (2-core x86_64 sandbox, Python 3.11, numpy 2.4, pycocotools 2.0.11, 22 MB file):
    ours 0.830 s, pycocotools 0.930 s, ratio ours/pycocotools = 0.89
    (0.81 to 0.93 over repeated runs while other jobs loaded the machine). Ours parses, checks every
    box and builds 10k records; it wins back that work by pausing the cyclic garbage collector
    during the build (see ``detr.data.formats.coco._gc_paused``) and converting columns in C.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def synthetic_coco(num_images: int, boxes_per_image: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    n = num_images * boxes_per_image
    x = rng.uniform(0, width - 50, n).round(2)
    y = rng.uniform(0, height - 50, n).round(2)
    w = rng.uniform(1, 50, n).round(2)
    h = rng.uniform(1, 50, n).round(2)
    image_ids = np.repeat(np.arange(1, num_images + 1), boxes_per_image)
    rng.shuffle(image_ids)  # annotations of an image scattered through the file, as in real COCO
    category_ids = rng.choice(np.array([1, 2, 3, 5, 8, 13, 21, 34]), n)
    annotations = [
        {
            "id": k + 1,
            "image_id": int(image_ids[k]),
            "category_id": int(category_ids[k]),
            "bbox": [float(x[k]), float(y[k]), float(w[k]), float(h[k])],
            "area": round(float(w[k] * h[k]), 2),
            "iscrowd": 0,
            "segmentation": [[float(x[k]), float(y[k]), float(x[k] + w[k]), float(y[k]),
                              float(x[k] + w[k]), float(y[k] + h[k]), float(x[k]), float(y[k] + h[k])]],
        }
        for k in range(n)
    ]
    return {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": width, "height": height}
                   for i in range(1, num_images + 1)],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class_{c}"} for c in (1, 2, 3, 5, 8, 13, 21, 34)],
    }


def best_times(repeats: int, candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best wall time of each candidate over ``repeats`` rounds, the candidates interleaved so a
    change in machine load hits both alike. Each call starts from a collected heap, and its result
    is freed after the clock stops: reading is timed, not freeing, for both readers alike."""
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            gc.collect()
            start = time.perf_counter()
            result = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            del result
    gc.collect()
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--boxes", type=int, default=10, help="boxes per image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from pycocotools.coco import COCO

    from detr.data import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotations" / "bench.json"
        path.parent.mkdir()
        path.write_text(json.dumps(synthetic_coco(args.images, args.boxes)))
        size_mb = path.stat().st_size / 1e6

        dataset = load_dataset(path, check_images=False)
        assert dataset.num_boxes == args.images * args.boxes, "reader lost boxes"

        def reference() -> COCO:
            with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
                return COCO(str(path))

        times = best_times(
            args.repeats, {"ours": lambda: load_dataset(path, check_images=False), "pycocotools": reference}
        )
        ours, theirs = times["ours"], times["pycocotools"]

    print(f"COCO file: {args.images} images, {args.images * args.boxes} annotations, {size_mb:.1f} MB")
    print(f"ours (detr.data.load_dataset):   {ours:.3f} s")
    print(f"pycocotools.coco.COCO:           {theirs:.3f} s")
    print(f"ratio ours/pycocotools:          {ours / theirs:.2f}")
    if ours > theirs:
        print("FAIL: our COCO reader is slower than pycocotools", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
