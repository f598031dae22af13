"""Draw one record: its boxes with class names (one colour per class) and its ignore regions.

Label text adds the box attributes that are set (``difficult``, ``crowd``, ``occ=2``,
``trunc=0.35``) so a look at an image shows what a view would filter. Ignore regions (e.g. KITTI
DontCare) are drawn as grey translucent areas labelled ``ignore``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from detr.data.dataset import DetectionDataset
from detr.data.loader import read_rgb_image
from detr.data.records import ImageRecord
from detr.errors import InvalidInputError

# Distinct, readable colours (Tableau 10); class id i uses PALETTE[i % 10].
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
IGNORE_COLOUR = "#808080"


def class_colour(class_id: int) -> str:
    return PALETTE[class_id % len(PALETTE)]


def box_captions(record: ImageRecord, class_names: tuple[str, ...]) -> list[str]:
    """ "name" plus the attributes that are set, one caption per box."""
    captions = []
    for i, label in enumerate(record.labels.tolist()):
        flags = []
        attributes = record.attributes
        if "difficult" in attributes and attributes["difficult"][i]:
            flags.append("difficult")
        if "iscrowd" in attributes and attributes["iscrowd"][i]:
            flags.append("crowd")
        if "occluded" in attributes and attributes["occluded"][i]:
            flags.append(f"occ={int(attributes['occluded'][i])}")
        if "truncated" in attributes and attributes["truncated"][i]:
            flags.append(f"trunc={float(attributes['truncated'][i]):.2g}")
        captions.append(" ".join([class_names[label], *flags]))
    return captions


def draw_record(
    dataset: DetectionDataset, index: int, *, width: int = 2, font_size: int | None = None
) -> torch.Tensor:
    """uint8 [3, H, W]: image ``index`` of ``dataset`` with its boxes and ignore regions drawn."""
    count = len(dataset)
    if count == 0:
        raise InvalidInputError(f"dataset {dataset.name!r} has no images to show")
    if not isinstance(index, int) or not 0 <= index < count:
        raise InvalidInputError(
            f"index {index!r} is out of range: dataset {dataset.name!r} has {count} images, "
            f"valid indices are 0..{count - 1}"
        )
    record = dataset.records[index]
    image = read_rgb_image(record)
    if len(record.ignore_regions):
        regions = torch.from_numpy(record.ignore_regions.copy())
        image = draw_bounding_boxes(
            image,
            regions,
            labels=["ignore"] * len(regions),
            colors=IGNORE_COLOUR,
            fill=True,
            width=1,
            font_size=font_size,
        )
    if record.num_boxes:
        image = draw_bounding_boxes(
            image,
            torch.from_numpy(record.boxes.copy()),
            labels=box_captions(record, dataset.label_map.names),
            colors=[class_colour(int(c)) for c in record.labels],
            width=width,
            font_size=font_size,
        )
    return image


def save_drawn_record(dataset: DetectionDataset, index: int, out: str | Path, **draw_options) -> Path:
    """Draw image ``index`` (see :func:`draw_record`) and save it as PNG at ``out``."""
    out = Path(out)
    image = draw_record(dataset, index, **draw_options)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(out, format="PNG")
    return out
