"""The dataset type every reader returns, and the report of what was repaired or dropped.

A :class:`DetectionDataset` is an immutable tuple of :class:`~detr.data.records.ImageRecord` plus
the :class:`~detr.data.labelmap.LabelMap` its labels index into. Nothing is dropped or repaired
silently: every reader, view and label edit counts what it changed in a :class:`DatasetReport`
(reason -> count, with a few example locations) that the CLI prints and the trainer logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord

MAX_EXAMPLES = 3


@dataclass(frozen=True)
class DatasetReport:
    """What reading, repairing and filtering did to a dataset.

    Attributes:
        counts: reason -> number of boxes or images it applies to, e.g.
            ``{"repair: box clipped to the image (<= 2 px outside)": 3}``. A reason starts with
            what happened: ``repair:`` / ``drop:`` (reading, under the repair policy), ``view:``
            (a view's filters), ``labels:`` (``data.labels.keep``), ``not carried:`` (source
            fields the record type has no place for), ``not written:`` / ``changed:`` (writing to
            a format that cannot express something).
        examples: reason -> up to three locations ("ann.json: annotations[12] (id=57)").
        notes: facts that are not per-box counts (a split skipped for having no labels, fields of
            the source format that are not carried).
    """

    counts: Mapping[str, int] = field(default_factory=dict)
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.counts or self.notes)

    def count(self, reason_prefix: str = "") -> int:
        """Total of the counts whose reason starts with ``reason_prefix`` ("" = all)."""
        return sum(n for reason, n in self.counts.items() if reason.startswith(reason_prefix))

    def merged(self, *others: DatasetReport) -> DatasetReport:
        builder = ReportBuilder()
        for report in (self, *others):
            builder.extend(report)
        return builder.build()

    def format(self) -> str:
        """Human-readable lines: one per reason with its count and examples, then the notes."""
        if not self:
            return "nothing repaired or dropped"
        lines = []
        for reason, n in self.counts.items():
            examples = self.examples.get(reason, ())
            shown = f"  (e.g. {'; '.join(examples)})" if examples else ""
            lines.append(f"{n:>8}  {reason}{shown}")
        lines.extend(f"    note  {note}" for note in self.notes)
        return "\n".join(lines)

    __str__ = format


class ReportBuilder:
    """Mutable collector used while reading or filtering; ``build()`` freezes it."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[str]] = {}
        self._notes: list[str] = []

    def add(self, reason: str, where: str | Sequence[str] = (), count: int | None = None) -> None:
        """Count ``reason`` once per location in ``where`` (or ``count`` times)."""
        places = [where] if isinstance(where, str) else list(where)
        n = count if count is not None else max(len(places), 1)
        if n <= 0:
            return
        self._counts[reason] = self._counts.get(reason, 0) + n
        examples = self._examples.setdefault(reason, [])
        for place in places[: MAX_EXAMPLES - len(examples)]:
            examples.append(place)

    def note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.append(text)

    def extend(self, report: DatasetReport) -> None:
        for reason, n in report.counts.items():
            self.add(reason, report.examples.get(reason, ()), count=n)
        for note in report.notes:
            self.note(note)

    def build(self) -> DatasetReport:
        return DatasetReport(
            counts=dict(self._counts),
            examples={k: tuple(v) for k, v in self._examples.items() if v},
            notes=tuple(self._notes),
        )


@dataclass(frozen=True)
class DetectionDataset:
    """An annotated image collection in the one record type.

    Attributes:
        records: one :class:`ImageRecord` per image; image ids are unique.
        label_map: the classes ``records[i].labels`` index into.
        name: a short human name (directory name, plus the split when one was chosen).
        format: the source format ("coco", "voc", "yolo", "kitti"), or "mixed" after combining.
        report: what was repaired, dropped or filtered on the way here.
    """

    records: tuple[ImageRecord, ...]
    label_map: LabelMap
    name: str
    format: str
    report: DatasetReport = field(default_factory=DatasetReport)

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def num_boxes(self) -> int:
        return sum(r.num_boxes for r in self.records)

    def class_counts(self) -> np.ndarray:
        """int64 [K] number of boxes per class id."""
        counts = np.zeros(len(self.label_map), dtype=np.int64)
        for record in self.records:
            counts += np.bincount(record.labels, minlength=len(self.label_map))
        return counts

    def summary(self) -> str:
        """One line: name, format, images, boxes, classes."""
        return (
            f"{self.name} ({self.format}): {len(self)} images, {self.num_boxes} boxes, "
            f"{len(self.label_map)} classes"
        )


def concatenate(
    parts: Sequence[DetectionDataset],
    prefixes: Sequence[str],
    *,
    name: str,
    format: str | None = None,
    label_map: LabelMap | None = None,
) -> DetectionDataset:
    """One dataset holding the records of ``parts`` in order.

    Labels are re-indexed into ``label_map`` (default: the union of the parts' maps in order).
    Image ids must stay unique: when any id occurs in two parts, every id becomes
    ``"<prefix>/<id>"`` with the part's prefix (its split name or source index), so ids are
    predictable from the inputs rather than depending on which ones happened to collide.
    """
    if len(parts) != len(prefixes):
        raise ValueError(f"{len(parts)} parts but {len(prefixes)} prefixes")
    target = label_map if label_map is not None else LabelMap.union(p.label_map for p in parts)
    seen: set = set()
    collide = False
    for part in parts:
        ids = {r.image_id for r in part.records}
        if not collide and not seen.isdisjoint(ids):
            collide = True
        seen |= ids
    records: list[ImageRecord] = []
    for part, prefix in zip(parts, prefixes, strict=True):
        old_to_new = part.label_map.mapping_to(target)
        if (old_to_new < 0).any():
            missing = [n for n, i in zip(part.label_map.names, old_to_new, strict=True) if i < 0]
            raise ValueError(f"label map {list(target.names)} lacks classes {missing} of {part.name}")
        identity = np.array_equal(old_to_new, np.arange(len(part.label_map)))
        for record in part.records:
            if not identity:
                record = record.relabel(old_to_new)
            if collide:
                record = replace(record, image_id=f"{prefix}/{record.image_id}")
            records.append(record)
    formats = {p.format for p in parts}
    if format is None:
        format = formats.pop() if len(formats) == 1 else "mixed"
    report = DatasetReport().merged(*(p.report for p in parts))
    if collide:
        builder = ReportBuilder()
        builder.extend(report)
        builder.note(
            f"image ids of {', '.join(repr(p) for p in prefixes)} collide; "
            "every image id was prefixed with '<part>/'"
        )
        report = builder.build()
    return DetectionDataset(tuple(records), target, name, format, report)


def with_records(
    dataset: DetectionDataset, records: Iterable[ImageRecord], report: DatasetReport | None = None
) -> DetectionDataset:
    """``dataset`` with other records (and optionally another report)."""
    return replace(dataset, records=tuple(records), report=dataset.report if report is None else report)
