"""Dataset statistics: what a dataset (or a config's view of it) holds, as a table and a plot.

Box size is measured as the square root of the box area in pixels, the scale COCO's small /
medium / large split uses (area < 32^2, < 96^2, the rest), with finer bins alongside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detr.data.dataset import DetectionDataset
from detr.data.records import ATTRIBUTE_DTYPES

COCO_SCALES = (("small", 0.0, 32.0), ("medium", 32.0, 96.0), ("large", 96.0, math.inf))
SIZE_BIN_EDGES = (0.0, 8.0, 16.0, 32.0, 48.0, 64.0, 96.0, 128.0, 256.0, 512.0, math.inf)
# objects-per-image histogram: exact counts up to 9, then ranges (upper None = no limit)
COUNT_BUCKETS = (*((n, n) for n in range(10)), (10, 19), (20, 49), (50, 99), (100, None))
TRUNCATION_BUCKETS = (
    ("none", 0.0, 0.0),
    ("(0, 0.3]", 0.0, 0.3),
    ("(0.3, 0.6]", 0.3, 0.6),
    ("(0.6, 1]", 0.6, 1.0),
)
NOT_RECORDED = "not recorded"


@dataclass(frozen=True, eq=False)
class DatasetStats:
    """Counts over one dataset. Arrays are per image (``objects_per_image``) or per box."""

    name: str
    source_format: str  # the dataset's format ("coco", ..., "mixed")
    class_names: tuple[str, ...]
    boxes_per_class: np.ndarray  # int64 [K]
    images_per_class: np.ndarray  # int64 [K]: images holding at least one box of the class
    objects_per_image: np.ndarray  # int64 [num_images]
    box_sqrt_areas: np.ndarray  # float64 [num_boxes] sqrt(w * h) in pixels
    attribute_counts: dict[str, dict[str, int]]  # attribute -> value bucket -> boxes
    ignore_regions: int
    images_with_ignore_regions: int
    report: str = ""
    size_bins: dict[str, int] = field(init=False)
    coco_scales: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        edges = np.array(SIZE_BIN_EDGES)
        counts = (
            np.histogram(self.box_sqrt_areas, bins=edges)[0]
            if len(self.box_sqrt_areas)
            else np.zeros(len(edges) - 1, int)
        )
        bins = {_range_label(lo, hi): int(n) for lo, hi, n in zip(edges[:-1], edges[1:], counts)}
        scales = {
            f"{name} ({_range_label(lo, hi)})": int(
                ((self.box_sqrt_areas >= lo) & (self.box_sqrt_areas < hi)).sum()
            )
            for name, lo, hi in COCO_SCALES
        }
        object.__setattr__(self, "size_bins", bins)
        object.__setattr__(self, "coco_scales", scales)

    @property
    def num_images(self) -> int:
        return len(self.objects_per_image)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes_per_class.sum())

    @property
    def images_without_boxes(self) -> int:
        return int((self.objects_per_image == 0).sum())

    def objects_per_image_histogram(self) -> dict[str, int]:
        """Bucket label ("3", "6-10", "101+") -> images, for the non-empty buckets."""
        histogram = {}
        for lo, hi in COUNT_BUCKETS:
            upper = np.inf if hi is None else hi
            n = int(((self.objects_per_image >= lo) & (self.objects_per_image <= upper)).sum())
            if n:
                label = str(lo) if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}")
                histogram[label] = n
        return histogram

    def format(self) -> str:
        """A readable multi-line table."""
        n_img, n_box = self.num_images, self.num_boxes
        lines = [
            f"dataset {self.name} ({self.source_format}): {n_img} images, {n_box} boxes, "
            f"{len(self.class_names)} classes"
        ]
        if n_img:
            per = self.objects_per_image
            lines.append(
                f"objects per image: min {per.min()}, mean {per.mean():.2f}, max {per.max()}; "
                f"images without boxes: {self.images_without_boxes}"
            )
            lines += _table("objects per image", "images", self.objects_per_image_histogram(), n_img)
        width = max([len("class"), *(len(c) for c in self.class_names)])
        lines.append("")
        lines.append(f"  {'class':<{width}}  {'boxes':>8}  {'share':>6}  {'images':>7}")
        for name, boxes, images in zip(self.class_names, self.boxes_per_class, self.images_per_class):
            lines.append(f"  {name:<{width}}  {boxes:>8}  {_percent(boxes, n_box):>6}  {images:>7}")
        lines += _table("box size (sqrt area, px)", "boxes", self.coco_scales, n_box)
        lines += _table("finer bins", "boxes", {k: v for k, v in self.size_bins.items() if v}, n_box)
        for name, buckets in self.attribute_counts.items():
            lines += _table(f"attribute {name}", "boxes", buckets, n_box)
        lines.append("")
        lines.append(f"ignore regions: {self.ignore_regions} in {self.images_with_ignore_regions} images")
        if self.report:
            lines.append("")
            lines.append("repaired, dropped or filtered on loading:")
            lines += [f"  {line}" for line in self.report.splitlines()]
        return "\n".join(lines)

    __str__ = format


def compute_stats(dataset: DetectionDataset) -> DatasetStats:
    """Count classes, objects per image, box sizes, attributes and ignore regions of ``dataset``."""
    records = dataset.records
    num_classes = len(dataset.label_map)
    boxes_per_class = np.zeros(num_classes, dtype=np.int64)
    images_per_class = np.zeros(num_classes, dtype=np.int64)
    for record in records:
        counts = np.bincount(record.labels, minlength=num_classes)
        boxes_per_class += counts
        images_per_class += counts > 0
    all_boxes = np.concatenate([r.boxes for r in records]) if records else np.zeros((0, 4), np.float32)
    widths = all_boxes[:, 2].astype(np.float64) - all_boxes[:, 0]
    heights = all_boxes[:, 3].astype(np.float64) - all_boxes[:, 1]
    return DatasetStats(
        name=dataset.name,
        source_format=dataset.format,
        class_names=tuple(dataset.label_map.names),
        boxes_per_class=boxes_per_class,
        images_per_class=images_per_class,
        objects_per_image=np.array([r.num_boxes for r in records], dtype=np.int64),
        box_sqrt_areas=np.sqrt(np.clip(widths, 0, None) * np.clip(heights, 0, None)),
        attribute_counts=_attribute_counts(dataset),
        ignore_regions=sum(len(r.ignore_regions) for r in records),
        images_with_ignore_regions=sum(1 for r in records if len(r.ignore_regions)),
        report=dataset.report.format() if dataset.report else "",
    )


def _attribute_counts(dataset: DetectionDataset) -> dict[str, dict[str, int]]:
    """Per attribute that any record carries: value bucket -> boxes (plus boxes without it)."""
    present = [name for name in ATTRIBUTE_DTYPES if any(name in r.attributes for r in dataset.records)]
    result: dict[str, dict[str, int]] = {}
    for name in present:
        values = [r.attributes[name] for r in dataset.records if name in r.attributes]
        missing = sum(r.num_boxes for r in dataset.records if name not in r.attributes)
        v = np.concatenate(values) if values else np.zeros(0)
        if name == "truncated":
            buckets = {
                label: int(((v == 0) if hi == 0 else ((v > lo) & (v <= hi))).sum())
                for label, lo, hi in TRUNCATION_BUCKETS
            }
        elif name == "occluded":
            levels = np.unique(v).tolist()
            buckets = {f"level {level}": int((v == level).sum()) for level in levels}
        else:  # boolean flags
            buckets = {"yes": int(np.count_nonzero(v)), "no": int(len(v) - np.count_nonzero(v))}
        if missing:
            buckets[NOT_RECORDED] = missing
        result[name] = buckets
    return result


def _table(title: str, unit: str, rows: dict[str, int], total: int) -> list[str]:
    if not rows:
        return []
    width = max(len(k) for k in rows)
    lines = ["", f"{title}:"]
    for key, n in rows.items():
        lines.append(f"  {key:<{width}}  {n:>8} {unit:<6}  {_percent(n, total):>6}")
    return lines


def _percent(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def _range_label(lo: float, hi: float) -> str:
    return f">= {lo:g}" if math.isinf(hi) else f"{lo:g}-{hi:g}"


def plot_box_sizes(stats: DatasetStats, path: str | Path) -> Path:
    """Save a PNG with the box-size histogram (COCO thresholds marked) and the boxes per class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)  # Agg, without touching pyplot's global state
    sizes_axis, classes_axis = figure.subplots(1, 2)
    areas = stats.box_sqrt_areas
    if len(areas):
        top = max(float(areas.max()), 2.0)
        bins = np.geomspace(1.0, top * 1.05, 40)
        sizes_axis.hist(np.clip(areas, 1.0, None), bins=bins, color="#4c72b0")
        sizes_axis.set_xscale("log")
    for threshold, label in ((32, "small | medium"), (96, "medium | large")):
        sizes_axis.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1)
        sizes_axis.annotate(
            label,
            (threshold, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color="#c44e52",
        )
    sizes_axis.set_xlabel("sqrt(box area) [px]")
    sizes_axis.set_ylabel("boxes")
    sizes_axis.set_title(f"box sizes ({stats.num_boxes} boxes)")
    positions = np.arange(len(stats.class_names))
    classes_axis.bar(positions, stats.boxes_per_class, color="#55a868")
    classes_axis.set_xticks(positions, stats.class_names, rotation=45, ha="right", fontsize=8)
    classes_axis.set_ylabel("boxes")
    classes_axis.set_title(f"boxes per class ({stats.name})")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
