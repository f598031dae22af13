"""The datasets of a :class:`~detr.config.DataConfig`: sources of any format, one label map.

Steps of :func:`load_splits`:

1. read every :class:`~detr.config.SourceSpec` of ``data.train`` and ``data.val`` with
   ``data.repair`` (a path read by both splits with the same format and split is read once);
2. build ONE label map: :meth:`LabelMap.union` over all sources, train sources first, in order;
3. apply ``data.labels``: ``rename`` (several names to one merges classes), then ``keep`` (boxes of
   classes not kept are removed and counted per class in the report);
4. concatenate the sources of each split; when image ids of two sources of a split collide, every
   id of that split becomes ``"<source index>/<id>"`` (indices count from 0 in config order);
5. apply the split's ``view``.

Both splits therefore share one label map, which is what the model, checkpoints and served model
carry. ``load_split`` reads both splits too, because the label map depends on both.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from detr.config import DataConfig, RepairPolicy, SourceSpec
from detr.data.dataset import DetectionDataset, ReportBuilder, concatenate
from detr.data.formats import load_dataset
from detr.data.labelmap import LabelMap
from detr.data.views import apply_view
from detr.errors import ConfigError

SPLITS = ("train", "val")


def load_splits(data: DataConfig, *, check_images: bool = True) -> dict[str, DetectionDataset]:
    """"train" / "val" (those set in ``data``) -> dataset in the combined label map."""
    specs = {name: getattr(data, name) for name in SPLITS if getattr(data, name) is not None}
    if not specs:
        raise ConfigError("data: neither data.train nor data.val is set; give at least one split with sources")
    cache: dict[tuple, DetectionDataset] = {}
    loaded = {
        split: [_load(source, data.repair, check_images, cache) for source in spec.sources]
        for split, spec in specs.items()
    }
    union = LabelMap.union(ds.label_map for parts in loaded.values() for ds in parts)
    label_map, old_to_new = union.remap(data.labels.rename, data.labels.keep)
    result = {}
    for split, parts in loaded.items():
        relabelled = [_relabel(ds, union, label_map, old_to_new, data) for ds in parts]
        combined = concatenate(
            relabelled,
            [str(i) for i in range(len(parts))],
            name=split if len(parts) > 1 else relabelled[0].name,
            label_map=label_map,
        )
        result[split] = apply_view(combined, specs[split].view)
    return result


def load_split(data: DataConfig, split: str, *, check_images: bool = True) -> DetectionDataset:
    """One split of :func:`load_splits` ("train" or "val")."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {list(SPLITS)}")
    if getattr(data, split) is None:
        raise ConfigError(f"data.{split} is not set in the config; set data.{split}.sources")
    return load_splits(data, check_images=check_images)[split]


def _load(source: SourceSpec, repair: RepairPolicy, check_images: bool, cache: dict) -> DetectionDataset:
    key = (Path(source.path).resolve(), source.format, source.split)
    if key not in cache:
        cache[key] = load_dataset(
            source.path, format=source.format, split=source.split, repair=repair, check_images=check_images
        )
    return cache[key]


def _relabel(
    dataset: DetectionDataset, union: LabelMap, label_map: LabelMap, old_to_new: np.ndarray, data: DataConfig
) -> DetectionDataset:
    """``dataset`` with labels in ``label_map``; boxes of classes not kept are counted and removed."""
    mapping = old_to_new[dataset.label_map.mapping_to(union)]  # [K_dataset] -> new id or -1
    if np.array_equal(mapping, np.arange(len(dataset.label_map))) and len(mapping) == len(label_map):
        return replace(dataset, label_map=label_map)
    report = ReportBuilder()
    report.extend(dataset.report)
    for old, new in data.labels.rename.items():
        if old in dataset.label_map:
            report.note(f"labels.rename: {old!r} -> {new!r} in {dataset.name}")
    records = []
    for record in dataset.records:
        removed = mapping[record.labels] < 0 if record.num_boxes else np.zeros(0, bool)
        if removed.any():
            idx = np.flatnonzero(removed)
            for class_id in np.unique(record.labels[idx]):
                of_class = idx[record.labels[idx] == class_id]
                report.add(
                    f"labels: dropped {dataset.label_map.names[class_id]!r} box (class not in labels.keep)",
                    [record.box_sources[i] for i in of_class[:3]],
                    count=len(of_class),
                )
        records.append(record.relabel(mapping))
    return DetectionDataset(tuple(records), label_map, dataset.name, dataset.format, report.build())
