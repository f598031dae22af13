"""Dataset health: what in a dataset will make training harder, as warnings with counts.

Checks (none of them is an error; each is counted, with up to three example locations):

* **boxes smaller than the model's output stride**: width or height below ``stride`` pixels of the
  image as stored. One cell of the coarsest feature map the model sees then covers the whole box
  (DETR: stride 32, or 16 with a dilated last stage; Deformable DETR with 3+ levels: 8).
* **near-duplicate boxes**: two boxes of the same class in one image with IoU >= ``NEAR_DUPLICATE_IOU``
  (usually one object labelled twice; the Hungarian matching then forces one query to "miss").
* **images without boxes** (fine as negatives, worth knowing when unintended).
* **class imbalance**: the most frequent class has more than ``IMBALANCE_RATIO`` times the boxes of
  the least frequent one, or a class has no box at all.
* **box size per class**: quantiles of sqrt(box area) per class (text) and their distribution (plot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from detr.data.dataset import DetectionDataset
from detr.errors import InvalidInputError

NEAR_DUPLICATE_IOU = 0.9
IMBALANCE_RATIO = 10.0
DEFAULT_STRIDE = 32  # DETR's output stride (ResNet layer4)
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
MAX_EXAMPLES = 3


@dataclass(frozen=True, eq=False)
class DatasetHealth:
    """Health counts of one dataset; ``warnings()`` lists what needs attention."""

    name: str
    stride: int
    class_names: tuple[str, ...]
    num_images: int
    boxes_per_class: np.ndarray  # int64 [K]
    small_per_class: np.ndarray  # int64 [K]: boxes with width or height < stride
    small_examples: tuple[str, ...]
    near_duplicates: int  # boxes that repeat an earlier box of their class (IoU >= NEAR_DUPLICATE_IOU)
    duplicate_examples: tuple[str, ...]
    images_without_boxes: int
    empty_examples: tuple[str, ...]
    sizes_per_class: tuple[np.ndarray, ...]  # K float64 arrays: sqrt(area) of each box in pixels

    @property
    def num_boxes(self) -> int:
        return int(self.boxes_per_class.sum())

    @property
    def small_boxes(self) -> int:
        return int(self.small_per_class.sum())

    @property
    def imbalance(self) -> float:
        """Boxes of the most frequent class / boxes of the least frequent (inf when one has none)."""
        if not len(self.boxes_per_class) or self.num_boxes == 0:
            return 1.0
        low = int(self.boxes_per_class.min())
        return math.inf if low == 0 else float(self.boxes_per_class.max()) / low

    def size_quantiles(self) -> dict[str, tuple[float, ...]]:
        """Class -> sqrt(area) at QUANTILES (min, p10, median, p90, max), for classes with boxes."""
        return {
            name: tuple(float(q) for q in np.quantile(sizes, QUANTILES))
            for name, sizes in zip(self.class_names, self.sizes_per_class, strict=True)
            if len(sizes)
        }

    def warnings(self) -> list[str]:
        """One line per problem found, with its count; empty when the dataset looks healthy."""
        lines = []
        if self.small_boxes:
            per_class = ", ".join(
                f"{n} {c}" for c, n in zip(self.class_names, self.small_per_class.tolist(), strict=True) if n
            )
            lines.append(
                f"{self.small_boxes} of {self.num_boxes} boxes are smaller than the model's output stride "
                f"({self.stride} px wide or high): {per_class}{_examples(self.small_examples)}"
            )
        if self.near_duplicates:
            lines.append(
                f"{self.near_duplicates} near-duplicate boxes (same class, IoU >= {NEAR_DUPLICATE_IOU:g} with "
                f"another box of the image){_examples(self.duplicate_examples)}"
            )
        if self.images_without_boxes:
            lines.append(
                f"{self.images_without_boxes} of {self.num_images} images have no boxes"
                f"{_examples(self.empty_examples)}"
            )
        empty = [c for c, n in zip(self.class_names, self.boxes_per_class.tolist(), strict=True) if n == 0]
        if empty and self.num_boxes:
            lines.append(f"{len(empty)} classes have no boxes: {empty}")
        elif self.imbalance > IMBALANCE_RATIO:
            top = self.class_names[int(self.boxes_per_class.argmax())]
            bottom = self.class_names[int(self.boxes_per_class.argmin())]
            lines.append(
                f"class imbalance {self.imbalance:.1f}:1 (> {IMBALANCE_RATIO:g}): {top!r} has "
                f"{int(self.boxes_per_class.max())} boxes, {bottom!r} {int(self.boxes_per_class.min())}"
            )
        return lines

    def metrics(self) -> dict[str, float]:
        """Counts as numbers (logged to MLflow by training)."""
        return {
            "small_boxes": float(self.small_boxes),
            "near_duplicate_boxes": float(self.near_duplicates),
            "images_without_boxes": float(self.images_without_boxes),
            "class_imbalance": self.imbalance if math.isfinite(self.imbalance) else float(self.num_boxes),
        }

    def format(self) -> str:
        lines = [f"health of {self.name} (output stride {self.stride} px):"]
        found = self.warnings()
        lines += [f"  warning: {w}" for w in found] or ["  no warnings"]
        quantiles = self.size_quantiles()
        if quantiles:
            width = max(len("class"), *(len(c) for c in quantiles))
            lines.append("")
            lines.append("box size per class (sqrt area, px):")
            lines.append(f"  {'class':<{width}}  {'min':>7} {'p10':>7} {'median':>7} {'p90':>7} {'max':>7}")
            for name, values in quantiles.items():
                lines.append(f"  {name:<{width}}  " + " ".join(f"{v:>7.1f}" for v in values))
        return "\n".join(lines)

    __str__ = format


def _examples(places: tuple[str, ...]) -> str:
    return f" (e.g. {'; '.join(places)})" if places else ""


def compute_health(dataset: DetectionDataset, stride: int = DEFAULT_STRIDE) -> DatasetHealth:
    """The health counts of ``dataset`` for a model whose finest feature map has ``stride``."""
    if not isinstance(stride, int) or stride < 1:
        raise InvalidInputError(f"stride={stride!r}: expected a positive integer (pixels per feature-map cell)")
    num_classes = len(dataset.label_map)
    boxes_per_class = np.zeros(num_classes, np.int64)
    small_per_class = np.zeros(num_classes, np.int64)
    sizes: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    small_examples: list[str] = []
    duplicate_examples: list[str] = []
    empty_examples: list[str] = []
    near_duplicates = images_without_boxes = 0
    for record in dataset.records:
        if record.num_boxes == 0:
            images_without_boxes += 1
            if len(empty_examples) < MAX_EXAMPLES:
                empty_examples.append(str(record.image_path))
            continue
        boxes = record.boxes.astype(np.float64)  # [N, 4] xyxy
        wh = boxes[:, 2:] - boxes[:, :2]  # [N, 2]
        small = wh.min(axis=1) < stride
        boxes_per_class += np.bincount(record.labels, minlength=num_classes)
        small_per_class += np.bincount(record.labels[small], minlength=num_classes)
        area = np.sqrt(wh.prod(axis=1))
        for class_id in np.unique(record.labels):
            sizes[class_id].append(area[record.labels == class_id])
        for i in np.flatnonzero(small)[: MAX_EXAMPLES - len(small_examples)]:
            small_examples.append(record.box_sources[i])
        duplicates = _near_duplicates(record.boxes, record.labels)
        near_duplicates += len(duplicates)
        for i in duplicates[: MAX_EXAMPLES - len(duplicate_examples)]:
            duplicate_examples.append(record.box_sources[i])
    return DatasetHealth(
        name=dataset.name,
        stride=stride,
        class_names=tuple(dataset.label_map.names),
        num_images=len(dataset),
        boxes_per_class=boxes_per_class,
        small_per_class=small_per_class,
        small_examples=tuple(small_examples),
        near_duplicates=near_duplicates,
        duplicate_examples=tuple(duplicate_examples),
        images_without_boxes=images_without_boxes,
        empty_examples=tuple(empty_examples),
        sizes_per_class=tuple(np.concatenate(s) if s else np.zeros(0) for s in sizes),
    )


def _near_duplicates(boxes: np.ndarray, labels: np.ndarray) -> list[int]:
    """Indices of boxes with IoU >= NEAR_DUPLICATE_IOU with an earlier box of the same class."""
    if len(boxes) < 2:
        return []
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()  # [N, N]
    same = (labels[:, None] == labels[None, :]) & (iou >= NEAR_DUPLICATE_IOU)
    earlier = np.tril(same, k=-1)  # pairs (i, j) with j < i
    return np.flatnonzero(earlier.any(axis=1)).tolist()


def plot_health(health: DatasetHealth, path: str | Path | None = None):
    """A figure: box sizes per class (with the stride marked) and boxes per class (small ones
    highlighted). Saved as PNG when ``path`` is given; returned for ``mlflow.log_figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    sizes_axis, counts_axis = figure.subplots(1, 2)
    names = list(health.class_names)
    positions = np.arange(1, len(names) + 1)
    with_boxes = [i for i, s in enumerate(health.sizes_per_class) if len(s)]
    if with_boxes:
        sizes_axis.boxplot([np.clip(health.sizes_per_class[i], 1.0, None) for i in with_boxes],
                           positions=positions[with_boxes], widths=0.6)
        sizes_axis.set_yscale("log")
    sizes_axis.axhline(health.stride, color="#c44e52", linestyle="--", linewidth=1,
                       label=f"output stride {health.stride} px")
    sizes_axis.legend(fontsize=8)
    sizes_axis.set_xticks(positions, names, rotation=45, ha="right", fontsize=8)
    sizes_axis.set_ylabel("sqrt(box area) [px]")
    sizes_axis.set_title(f"box size per class ({health.name})")
    counts_axis.bar(positions, health.boxes_per_class, color="#55a868", label="boxes")
    counts_axis.bar(positions, health.small_per_class, color="#c44e52", label=f"< {health.stride} px")
    counts_axis.set_xticks(positions, names, rotation=45, ha="right", fontsize=8)
    counts_axis.set_ylabel("boxes")
    counts_axis.legend(fontsize=8)
    counts_axis.set_title(
        f"{health.near_duplicates} near-duplicates, {health.images_without_boxes} empty images"
    )
    figure.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    return figure
