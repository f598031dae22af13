"""Views: which boxes and images of a dataset a split uses (a :class:`~detr.config.ViewSpec`).

Order of the filters (each one counted in the report with a reason and example locations):

1. box filters: ``include_labels`` / ``exclude_labels``, ``drop.difficult``, ``drop.crowd``,
   ``drop.occluded_above``, ``drop.truncated_above``, ``min_box_size`` (width or height below it);
2. image filters on what is left: ``require`` (at least that many boxes of each named class),
   ``drop_empty_images``;
3. ``max_images``: the first N images still kept, in dataset order (deterministic).

A view never changes the label map: ``include_labels`` removes boxes, not classes (removing classes
is ``data.labels.keep``). Class names are checked against the label map; an unknown name is an
error listing the known ones. A ``drop.*`` rule whose attribute no record has does nothing and says
so in the report's notes. Ignore regions are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from detr.config import ViewSpec
from detr.data.dataset import DetectionDataset, ReportBuilder, with_records
from detr.data.records import ImageRecord
from detr.errors import ConfigError


def _check_names(dataset: DetectionDataset, names: Iterable[str], field: str) -> list[int]:
    names = list(names)
    unknown = [n for n in names if n not in dataset.label_map]
    if unknown:
        raise ConfigError(
            f"view.{field}: unknown classes {unknown} for dataset {dataset.name}; "
            f"known classes: {list(dataset.label_map.names)}"
        )
    return [dataset.label_map.id_of(n) for n in names]


def _box_rules(dataset: DetectionDataset, view: ViewSpec) -> list[tuple[str, Callable]]:
    """(reason, record -> bool [N] boxes to drop) for each active box filter."""
    rules = []
    if view.include_labels is not None:
        include = np.array(_check_names(dataset, view.include_labels, "include_labels"), np.int64)
        rules.append(("not in include_labels", lambda r: ~np.isin(r.labels, include)))
    if view.exclude_labels:
        exclude = np.array(_check_names(dataset, view.exclude_labels, "exclude_labels"), np.int64)
        rules.append(("in exclude_labels", lambda r: np.isin(r.labels, exclude)))

    def attribute(name: str, test) -> Callable:
        return lambda r: test(r.attributes[name]) if name in r.attributes else np.zeros(r.num_boxes, bool)

    drop = view.drop
    if drop.difficult:
        rules.append(("difficult", attribute("difficult", lambda v: v.astype(bool))))
    if drop.crowd:
        rules.append(("crowd (iscrowd)", attribute("iscrowd", lambda v: v.astype(bool))))
    if drop.occluded_above is not None:
        level = drop.occluded_above
        rules.append((f"occluded > {level:g}", attribute("occluded", lambda v: v > level)))
    if drop.truncated_above is not None:
        level = drop.truncated_above
        rules.append((f"truncated > {level:g}", attribute("truncated", lambda v: v > level)))
    if view.min_box_size:
        size = view.min_box_size
        rules.append((
            f"smaller than min_box_size = {size} px",
            lambda r: ((r.boxes[:, 2] - r.boxes[:, 0]) < size) | ((r.boxes[:, 3] - r.boxes[:, 1]) < size),
        ))
    return rules


def _note_missing_attributes(dataset: DetectionDataset, view: ViewSpec, report: ReportBuilder) -> None:
    wanted = {
        "difficult": view.drop.difficult,
        "iscrowd": view.drop.crowd,
        "occluded": view.drop.occluded_above is not None,
        "truncated": view.drop.truncated_above is not None,
    }
    present = set().union(*(r.attributes.keys() for r in dataset.records)) if dataset.records else set()
    for name, active in wanted.items():
        if active and name not in present:
            report.note(f"view: the {name!r} filter has no effect, {dataset.name} has no {name!r} attribute")


def apply_view(dataset: DetectionDataset, view: ViewSpec) -> DetectionDataset:
    """The records of ``dataset`` that ``view`` keeps, with the filtering added to the report."""
    rules = _box_rules(dataset, view)
    required = dict(zip(_check_names(dataset, view.require, "require"), view.require.values(), strict=True))
    report = ReportBuilder()
    report.extend(dataset.report)
    _note_missing_attributes(dataset, view, report)
    names = dataset.label_map.names

    kept: list[ImageRecord] = []
    for record in dataset.records:
        keep = np.ones(record.num_boxes, dtype=bool)
        for reason, rule in rules:
            dropped = keep & rule(record)
            if dropped.any():
                idx = np.flatnonzero(dropped)
                for class_id in np.unique(record.labels[idx]):
                    of_class = idx[record.labels[idx] == class_id]
                    report.add(
                        f"view: dropped {names[class_id]!r} box, {reason}",
                        [record.box_sources[i] for i in of_class[:3]],
                        count=len(of_class),
                    )
                keep &= ~dropped
        if not keep.all():
            record = record.select(keep)
        if required:
            counts = np.bincount(record.labels, minlength=len(names))
            if any(counts[c] < n for c, n in required.items()):
                report.add(f"view: dropped image with fewer boxes than require = {dict(view.require)}", record.source)
                continue
        if view.drop_empty_images and record.num_boxes == 0:
            report.add("view: dropped image without boxes (drop_empty_images)", record.source)
            continue
        kept.append(record)

    if view.max_images is not None and len(kept) > view.max_images:
        beyond = kept[view.max_images:]
        report.add(f"view: dropped image beyond max_images = {view.max_images}", [r.source for r in beyond[:3]],
                   count=len(beyond))
        kept = kept[: view.max_images]
    boxes_before, boxes_after = dataset.num_boxes, sum(r.num_boxes for r in kept)
    report.note(
        f"view on {dataset.name}: kept {len(kept)}/{len(dataset)} images and {boxes_after}/{boxes_before} boxes"
    )
    return with_records(dataset, kept, report.build())
