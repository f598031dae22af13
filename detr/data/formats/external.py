"""Formats outside the package: a team's own reader (a plugin), and the Datumaro bridge built on it.

A plugin is a class implementing :class:`DatasetFormat`: it lists the splits and class names of a
dataset and yields its images as plain :class:`SourceImage` values (image path, boxes as ``x1 y1
x2 y2`` pixels, class names). Everything else -- box validation and ``data.repair``, the label map,
missing and wrongly sized images, error messages naming the file, the report, views, ``detr data
stats``/``convert``/``show``, training and the served model's label map -- is the package's, the
same as for the built-in formats. A ``write`` method is optional; with it ``detr data convert --to
<name>`` and :func:`~detr.data.write_dataset` write the format.

How a format name is found (:func:`resolve`):

* ``coco``, ``voc``, ``yolo``, ``kitti``: built in;
* ``datumaro:<fmt>``: any detection format Datumaro imports (the ``datumaro`` extra);
* ``package.module:ClassName``: the class, imported from the Python path;
* any other name: the entry point of that name in the group ``mlflow_detr.formats``, which a plugin
  package declares in its ``pyproject.toml``::

      [project.entry-points."mlflow_detr.formats"]
      acme = "acme_formats:AcmeFormat"
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from detr.data.dataset import DatasetReport, DetectionDataset, ReportBuilder, concatenate
from detr.data.formats.writing import unique_file_names
from detr.data.labelmap import LabelMap
from detr.data.records import ATTRIBUTE_DTYPES, ImageRecord
from detr.data.validate import BoxChecker, check_image_size, check_unique, read_image_size
from detr.errors import DatasetFormatError, InvalidInputError

ENTRY_POINT_GROUP = "mlflow_detr.formats"
CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class SourceImage:
    """One image as a plugin reads it.

    Attributes:
        path: the image file (relative paths are taken relative to the dataset path).
        boxes: N boxes ``(x1, y1, x2, y2)`` in pixels of the image (convert from the format's own
            convention in the plugin).
        labels: N class names, each one of the format's ``class_names``.
        width, height: the annotated image size, or None to read it from the image header.
        image_id: a stable id (default: the image file's stem).
        source: where the image's annotation was read ("ann/0001.json"), for error messages.
        box_sources: N places of the boxes ("ann/0001.json: objects[2]"); default ``source: box[i]``.
        attributes: per-box ``iscrowd``, ``difficult``, ``occluded``, ``truncated`` (N values each).
        not_carried: what the source holds that the record has no place for, as reason -> count
            (e.g. ``{"polygon annotation": 2}``); counted in the report as ``not carried: ...``.
    """

    path: str | Path
    boxes: Sequence[Sequence[float]] = ()
    labels: Sequence[str] = ()
    width: int | None = None
    height: int | None = None
    image_id: int | str | None = None
    source: str = ""
    box_sources: Sequence[str] | None = None
    attributes: Mapping[str, Sequence] = field(default_factory=dict)
    not_carried: Mapping[str, int] = field(default_factory=dict)


class DatasetFormat(ABC):
    """A dataset format: subclass it, implement the three readers, optionally ``write``.

    ``path`` is the dataset path given in the config or on the command line. Raise
    :class:`~detr.errors.DatasetFormatError` with the file and what is wrong for malformed input;
    anything else the package checks itself.
    """

    #: shown in messages and ``detr data stats`` (the format column)
    name: str = "plugin"
    #: the layout in one line, for error messages ("annotations/*.json + images/")
    layout: str = ""

    @abstractmethod
    def splits(self, path: Path) -> list[str]:
        """The split names of the dataset, in the order ``split=None`` reads them."""

    @abstractmethod
    def class_names(self, path: Path) -> Sequence[str]:
        """The classes, in id order (the order of the label map)."""

    @abstractmethod
    def images(self, path: Path, split: str) -> Iterable[SourceImage]:
        """The images of one split."""

    # Optional:
    # def write(self, path: Path, split: str, class_names: Sequence[str],
    #           images: Sequence[SourceImage]) -> None
    # writes one split (boxes xyxy pixels, ``image.path`` the existing image file to copy).


def resolve(format: str) -> DatasetFormat:
    """The :class:`DatasetFormat` for a ``datumaro:<fmt>``, ``module:Class`` or plugin name."""
    if format.startswith("datumaro:"):
        from detr.data.formats.datumaro_bridge import DatumaroFormat

        return DatumaroFormat(format.removeprefix("datumaro:"))
    if CLASS_PATH.match(format):
        module_name, class_name = format.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise InvalidInputError(f"dataset format {format!r}: cannot import module {module_name!r} ({e})") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise InvalidInputError(f"dataset format {format!r}: module {module_name!r} has no {class_name!r}")
        return _instance(cls, format)
    plugins = available_plugins()
    if format not in plugins:
        raise InvalidInputError(
            f"unknown dataset format {format!r}; expected one of ['auto', 'coco', 'voc', 'yolo', 'kitti'], "
            f"'datumaro:<format>', 'package.module:Class' or an installed plugin "
            f"(entry points in {ENTRY_POINT_GROUP!r}: {sorted(plugins) or 'none installed'})"
        )
    try:
        cls = plugins[format].load()
    except Exception as e:  # a broken plugin package: say which entry point, keep the cause
        raise InvalidInputError(
            f"dataset format plugin {format!r} ({plugins[format].value}) failed to load: {type(e).__name__}: {e}"
        ) from e
    return _instance(cls, format)


def available_plugins() -> dict:
    """Entry point name -> entry point, for the installed format plugins."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _instance(cls, format: str) -> DatasetFormat:
    if not (isinstance(cls, type) and issubclass(cls, DatasetFormat)):
        raise InvalidInputError(
            f"dataset format {format!r}: {cls!r} is not a subclass of detr.data.formats.external.DatasetFormat"
        )
    return cls()


# ---------------------------------------------------------------------------------------------
# the adapter: a DatasetFormat read and written like a built-in format module
# ---------------------------------------------------------------------------------------------


class ExternalModule:
    """Gives a :class:`DatasetFormat` the interface of the built-in format modules."""

    def __init__(self, plugin: DatasetFormat, format: str) -> None:
        self.plugin = plugin
        self.format = format

    def list_splits(self, root: Path) -> list[str]:
        return list(self.plugin.splits(root))

    def read(
        self, root: Path, split: str | None, *, checker: BoxChecker, report: ReportBuilder, check_images: bool
    ) -> DetectionDataset:
        splits = self.list_splits(root)
        if split is not None and split not in splits:
            raise DatasetFormatError(f"{root}: no {self.format} split {split!r}; available splits: {splits}")
        names = tuple(self.plugin.class_names(root))
        label_map = LabelMap(names)
        chosen = [split] if split is not None else splits
        if not chosen:
            raise DatasetFormatError(f"{root}: the {self.format} dataset has no splits ({self.plugin.layout})")
        parts = [
            self._read_split(root, name, label_map, checker, report, check_images) for name in chosen
        ]
        if len(parts) == 1:
            return parts[0]
        return concatenate(parts, chosen, name=root.name)

    def _read_split(
        self, root: Path, split: str, label_map: LabelMap, checker: BoxChecker, report: ReportBuilder,
        check_images: bool,
    ) -> DetectionDataset:
        records = []
        for k, image in enumerate(self.plugin.images(root, split)):
            records.append(self._record(root, split, k, image, label_map, checker, check_images))
            for reason, count in image.not_carried.items():
                report.add(f"not carried: {reason}", records[-1].source, count=int(count))
        check_unique([r.image_id for r in records], [r.source for r in records], "image id")
        return DetectionDataset(tuple(records), label_map, f"{root.name}:{split}", self.format)

    def _record(
        self, root: Path, split: str, k: int, image: SourceImage, label_map: LabelMap, checker: BoxChecker,
        check_images: bool,
    ) -> ImageRecord:
        if not isinstance(image, SourceImage):
            raise DatasetFormatError(
                f"{root}: format {self.format!r} yielded {type(image).__name__} for image {k} of split "
                f"{split!r}; expected detr.data.formats.external.SourceImage"
            )
        source = image.source or f"{root} [{self.format}] split {split!r} image {k}"
        path = Path(image.path)
        path = path if path.is_absolute() else root / path
        n = len(image.labels)
        boxes = np.asarray(image.boxes, dtype=np.float64).reshape(-1, 4) if n else np.zeros((0, 4))
        if len(boxes) != n:
            raise DatasetFormatError(f"{source}: {len(boxes)} boxes but {n} labels")
        box_sources = tuple(image.box_sources) if image.box_sources is not None else tuple(
            f"{source}: box[{i}]" for i in range(n)
        )
        if len(box_sources) != n:
            raise DatasetFormatError(f"{source}: {len(box_sources)} box sources for {n} boxes")
        if image.width is None or image.height is None:
            width, height = read_image_size(path, referenced_by=source)
        else:
            width, height = int(image.width), int(image.height)
            if width <= 0 or height <= 0:
                raise DatasetFormatError(f"{source}: image size must be positive, got {width}x{height}")
            if check_images:
                check_image_size(path, width, height, referenced_by=source)
        labels = np.array([label_map.id_of(name, where=box_sources[i]) for i, name in enumerate(image.labels)],
                          dtype=np.int64)
        attributes = _attributes(image.attributes, n, source)
        checked, keep = checker.check(boxes, width, height, box_sources)
        return ImageRecord(
            image_path=path,
            width=width,
            height=height,
            boxes=checked,
            labels=labels[keep],
            box_sources=tuple(s for s, kept in zip(box_sources, keep, strict=True) if kept),
            source=source,
            image_id=image.image_id if image.image_id is not None else path.stem,
            attributes={name: values[keep] for name, values in attributes.items()},
        )

    def write(self, dataset: DetectionDataset, out_dir: Path, split: str, images: str) -> DatasetReport:
        write = getattr(self.plugin, "write", None)
        if not callable(write):
            raise InvalidInputError(f"dataset format {self.format!r} can be read but has no writer (no write method)")
        if images != "copy":
            raise InvalidInputError(f"dataset format {self.format!r} writes copies of the images; use images='copy'")
        unique_file_names(dataset, split)
        names = dataset.label_map.names
        write(
            out_dir,
            split,
            names,
            [
                SourceImage(
                    path=r.image_path,
                    boxes=r.boxes.tolist(),
                    labels=[names[i] for i in r.labels.tolist()],
                    width=r.width,
                    height=r.height,
                    image_id=r.image_id,
                    source=r.source,
                    box_sources=r.box_sources,
                    attributes=dict(r.attributes),
                )
                for r in dataset.records
            ],
        )
        report = ReportBuilder()
        if any(len(r.ignore_regions) for r in dataset.records):
            report.add(
                f"not written: ignore region (no {self.format} field for it)",
                count=sum(len(r.ignore_regions) for r in dataset.records),
            )
        return report.build()


def _attributes(values: Mapping[str, Sequence], n: int, source: str) -> dict[str, np.ndarray]:
    result = {}
    for name, column in values.items():
        if name not in ATTRIBUTE_DTYPES:
            raise DatasetFormatError(
                f"{source}: unknown per-box attribute {name!r}; known: {sorted(ATTRIBUTE_DTYPES)}"
            )
        try:
            array = np.asarray(column, dtype=ATTRIBUTE_DTYPES[name])
        except (TypeError, ValueError):
            raise DatasetFormatError(
                f"{source}: attribute {name!r} values {list(column)[:5]} are not {np.dtype(ATTRIBUTE_DTYPES[name])}"
            ) from None
        if array.shape != (n,):
            raise DatasetFormatError(f"{source}: attribute {name!r} has {len(array)} values for {n} boxes")
        result[name] = array
    return result
