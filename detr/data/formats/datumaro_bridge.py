"""``datumaro:<fmt>``: every detection format Datumaro imports, read into the package's records.

Datumaro (the optional extra: ``pip install 'mlflow-detr[datumaro]'``) parses the dataset
(``Dataset.import_from(path, fmt)``: CVAT for images, LabelMe, Open Images, WIDER Face, MOT, ...);
this module turns its items into :class:`~.external.SourceImage` values, so boxes go through the
same checks, repairs, label map, views and report as the built-in formats.

What maps where:

* Datumaro subsets -> splits; its label categories -> the label map (in Datumaro's order);
* ``Bbox`` annotations -> boxes (Datumaro's ``x, y, w, h`` -> ``x1, y1, x2, y2`` pixels);
* box attributes ``occluded``, ``truncated``, ``difficult`` and ``is_crowd``/``iscrowd`` -> the
  record's attributes; other non-empty attributes are counted as ``not carried``;
* other annotation types (polygons, masks, points, captions, image labels) are counted in the report
  as ``not carried`` -- never silently dropped; a box without a label is an error.

Datumaro gives no file and line for an annotation; boxes are located as
``<dataset path> [datumaro:<fmt>] item '<id>' (subset <s>) annotation[<j>]``. Reading only: writing
through Datumaro is not offered (``detr data convert`` writes the built-in formats).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from detr.data.formats.external import DatasetFormat, SourceImage
from detr.errors import DatasetFormatError, InvalidInputError

INSTALL_HINT = "pip install 'mlflow-detr[datumaro]'"
# Datumaro attribute name -> record attribute name.
ATTRIBUTES = {"occluded": "occluded", "truncated": "truncated", "difficult": "difficult",
              "is_crowd": "iscrowd", "iscrowd": "iscrowd"}


def _datumaro():
    try:
        import datumaro  # noqa: F401  (optional extra; imported only when a datumaro: format is used)
        from datumaro.components.environment import Environment
    except ImportError:
        raise InvalidInputError(
            f"dataset formats 'datumaro:<fmt>' need the datumaro package; install it with {INSTALL_HINT}"
        ) from None
    return Environment


def importer_names() -> list[str]:
    """The format names Datumaro can import (``datumaro:<name>``)."""
    return sorted(_datumaro()().importers)


class DatumaroFormat(DatasetFormat):
    """Reads ``path`` with Datumaro's importer ``fmt``."""

    layout = "any layout Datumaro's importer reads"

    def __init__(self, fmt: str) -> None:
        names = importer_names()
        if fmt not in names:
            raise InvalidInputError(f"datumaro:{fmt}: Datumaro has no importer {fmt!r}; available: {names}")
        self.fmt = fmt
        self.name = f"datumaro:{fmt}"
        self._cache: dict[Path, object] = {}

    def _dataset(self, path: Path):
        from datumaro.components.dataset import Dataset
        from datumaro.components.errors import DatasetImportError

        path = path.absolute()
        if path not in self._cache:
            try:
                self._cache[path] = Dataset.import_from(os.fspath(path), self.fmt)
            except DatasetImportError as e:
                cause = e.__cause__ or e
                raise DatasetFormatError(f"{path}: Datumaro cannot read it as {self.fmt!r} ({cause})") from None
        return self._cache[path]

    def splits(self, path: Path) -> list[str]:
        return sorted(self._dataset(path).subsets())

    def class_names(self, path: Path) -> Sequence[str]:
        from datumaro.components.annotation import AnnotationType

        categories = self._dataset(path).categories().get(AnnotationType.label)
        return [c.name for c in categories] if categories is not None else []

    def images(self, path: Path, split: str) -> Iterable[SourceImage]:
        from datumaro.components.annotation import AnnotationType, Bbox

        dataset = self._dataset(path)
        path = path.absolute()
        categories = dataset.categories().get(AnnotationType.label)
        names = [c.name for c in categories] if categories is not None else []
        for item in dataset.get_subset(split):
            source = f"{path} [{self.name}] item {item.id!r} (subset {split})"
            media_path = getattr(item.media, "path", None)
            if not media_path:
                raise DatasetFormatError(f"{source}: no image file (Datumaro found no media for this item)")
            size = item.media.size if item.media.has_size else None  # (H, W) from the annotation
            boxes, labels, box_sources, attributes = [], [], [], []
            not_carried: Counter = Counter()
            for j, ann in enumerate(item.annotations):
                at = f"{source} annotation[{j}]"
                if not isinstance(ann, Bbox):
                    not_carried[f"Datumaro {ann.type.name} annotation (only boxes are read)"] += 1
                    continue
                if ann.label is None or not 0 <= ann.label < len(names):
                    raise DatasetFormatError(f"{at}: box without a valid label (label={ann.label!r}); classes: {names}")
                x, y, w, h = ann.get_bbox()
                boxes.append([x, y, x + w, y + h])
                labels.append(names[ann.label])
                box_sources.append(at)
                kept = {}
                for key, value in ann.attributes.items():
                    if key in ATTRIBUTES:
                        kept[ATTRIBUTES[key]] = value
                    elif value not in ("", None, False):
                        not_carried[f"Datumaro box attribute {key!r}"] += 1
                attributes.append(kept)
            yield SourceImage(
                path=Path(media_path),
                boxes=boxes,
                labels=labels,
                width=None if size is None else size[1],
                height=None if size is None else size[0],
                image_id=item.id,
                source=source,
                box_sources=box_sources,
                attributes=_columns(attributes),
                not_carried=dict(not_carried),
            )


def _columns(per_box: list[dict]) -> dict[str, list]:
    """Per-box attribute dicts -> attribute -> one value per box (0 / False where a box lacks it)."""
    names = sorted({name for attrs in per_box for name in attrs})
    return {name: [_value(attrs.get(name, 0)) for attrs in per_box] for name in names}


def _value(value):
    if isinstance(value, str):  # LabelMe / CVAT text flags
        return {"true": 1, "yes": 1, "false": 0, "no": 0, "": 0}.get(value.strip().lower(), value)
    return value
