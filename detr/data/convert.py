"""``detr data convert``: rewrite a dataset in another format, split by split.

Every split of the source (or the one asked for) is read and written under the same split name, so
``train``/``val`` stay apart. The splits share one label map (their union, in split order), since
YOLO's ``data.yaml`` and the ``labels.txt`` of VOC/KITTI hold one list for all splits. A VOC source
without ``ImageSets/Main`` lists is written as split ``train``. The output directory must be new or
empty. The summary names, per split, the images and boxes written, what reading repaired or
dropped, and what the target format could not hold.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from detr.config import RepairPolicy
from detr.data.dataset import DetectionDataset, ReportBuilder
from detr.data.formats import FORMATS, list_splits, load_dataset, resolve_format, write_split
from detr.data.labelmap import LabelMap
from detr.errors import DatasetFormatError, InvalidInputError

DEFAULT_SPLIT = "train"


def convert_dataset(
    src: str | Path,
    dst: str | Path,
    src_format: str = "auto",
    dst_format: str = "coco",
    split: str | None = None,
    *,
    images: str = "copy",
    repair: RepairPolicy | None = None,
) -> str:
    """Convert ``src`` to ``dst_format`` in ``dst``; returns a human summary."""
    src, dst = Path(src), Path(dst)
    if dst_format == "auto":
        raise InvalidInputError(f"target format 'auto': name the format to write, e.g. one of {list(FORMATS)}")
    resolve_format(dst, dst_format)  # an unknown name fails before anything is read
    if not src.exists():
        raise DatasetFormatError(f"{src}: dataset path not found")
    src_format = resolve_format(src, src_format)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DatasetFormatError(f"{dst}: output directory exists and is not empty; choose a new directory")

    splits: list[str | None] = [split] if split is not None else list(list_splits(src, src_format))
    if not splits:
        splits = [None]
    parts = {
        (name or DEFAULT_SPLIT): load_dataset(src, src_format, split=name, repair=repair)
        for name in splits
    }
    label_map = LabelMap.union(ds.label_map for ds in parts.values())
    lines = [f"converted {src} ({src_format}) -> {dst} ({dst_format})"]
    losses = ReportBuilder()
    read_report = ReportBuilder()
    for name, dataset in parts.items():
        dataset = _in_label_map(dataset, label_map)
        _, lost = write_split(dataset, dst, dst_format, split=name, images=images)
        losses.extend(lost)
        read_report.extend(dataset.report)
        lines.append(f"  split {name}: {len(dataset)} images, {dataset.num_boxes} boxes")
    lines.append(f"  classes ({len(label_map)}): {', '.join(label_map.names)}")
    read_done, lost_done = read_report.build(), losses.build()
    if read_done:
        lines.append("reading:")
        lines.append(read_done.format())
    if lost_done:
        lines.append("writing:")
        lines.append(lost_done.format())
    return "\n".join(lines)


def _in_label_map(dataset: DetectionDataset, label_map: LabelMap) -> DetectionDataset:
    if dataset.label_map.names == label_map.names:
        return dataset
    mapping = dataset.label_map.mapping_to(label_map)  # a superset: no -1
    return replace(dataset, records=tuple(r.relabel(mapping) for r in dataset.records), label_map=label_map)
