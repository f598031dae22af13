"""Reading and writing detection formats as one record type.

``load_dataset`` reads any of them into a :class:`~detr.data.dataset.DetectionDataset`;
``write_dataset`` writes one split of a dataset in any of them. Built in: COCO, VOC, YOLO, KITTI
(layouts documented in :mod:`.coco`, :mod:`.voc`, :mod:`.yolo` / :mod:`.yolo_layout`, :mod:`.kitti`
and recognised by :func:`~.detect.detect_format`). Through :mod:`.external`: ``datumaro:<fmt>``
(every format Datumaro imports), a plugin's entry-point name, or ``package.module:Class``.

Splits: ``split=None`` reads every split of the dataset and concatenates them in the order of
:func:`list_splits` (VOC unites its overlapping lists instead, see :mod:`.voc`); when image ids of
two splits collide every id becomes ``"<split>/<id>"``, so ids stay unique. Label maps of the splits
are united in split order.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from detr.config import RepairPolicy, ViewSpec
from detr.data.dataset import DatasetReport, DetectionDataset, ReportBuilder
from detr.data.formats import coco, external, kitti, voc, yolo
from detr.data.formats.detect import LAYOUTS, detect_format
from detr.data.formats.writing import check_image_mode, check_split_name
from detr.data.validate import BoxChecker
from detr.errors import DatasetFormatError, InvalidInputError

FORMATS = ("coco", "voc", "yolo", "kitti")
_MODULES = {"coco": coco, "voc": voc, "yolo": yolo, "kitti": kitti}


class DatasetWriteWarning(UserWarning):
    """Something in the dataset has no place in the target format and was not written."""


def _module(format: str):
    """The reader/writer of ``format``: a built-in module, or a :mod:`.external` format adapted."""
    if not isinstance(format, str) or not format:
        raise InvalidInputError(f"dataset format {format!r}: expected a format name such as 'coco'")
    if format in _MODULES:
        return _MODULES[format]
    return external.ExternalModule(external.resolve(format), format)


def resolve_format(path: Path, format: str = "auto") -> str:
    if format == "auto":
        return detect_format(path)
    _module(format)
    return format


def list_splits(path: str | Path, format: str = "auto") -> list[str]:
    """The split names of a dataset, in the order ``split=None`` reads them."""
    path = Path(path)
    return _module(resolve_format(path, format)).list_splits(path)


def load_dataset(
    path: str | Path,
    format: str = "auto",
    split: str | None = None,
    view: ViewSpec | None = None,
    repair: RepairPolicy | None = None,
    check_images: bool = True,
) -> DetectionDataset:
    """Read a dataset in any supported format.

    Args:
        path: the dataset directory (or a COCO ``.json`` / YOLO ``data.yaml`` file).
        format: "auto" (from the layout, see :mod:`.detect`), "coco", "voc", "yolo", "kitti",
            "datumaro:<fmt>", a plugin's entry-point name or "package.module:Class" (:mod:`.external`).
        split: one split (e.g. "train"); None reads all splits concatenated (module docstring).
        view: an optional :class:`~detr.config.ViewSpec` applied after reading.
        repair: what may be repaired instead of rejected (default: nothing, every problem raises).
        check_images: check that every image exists and its header size equals the annotated one.
            YOLO and KITTI labels carry no image size, so they read every header regardless.

    Raises:
        DatasetFormatError: naming the file and line/object of the first problem.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetFormatError(f"{path}: dataset path not found")
    module = _module(resolve_format(path, format))
    report = ReportBuilder()
    dataset = module.read(
        path, split, checker=BoxChecker(repair, report), report=report, check_images=check_images
    )
    dataset = _with_report(dataset, report.build())
    if view is not None:
        from detr.data.views import apply_view

        dataset = apply_view(dataset, view)
    return dataset


def _with_report(dataset: DetectionDataset, report: DatasetReport) -> DetectionDataset:
    return replace(dataset, report=dataset.report.merged(report))


def write_split(
    dataset: DetectionDataset, out_dir: str | Path, format: str, split: str = "train", images: str = "copy"
) -> tuple[Path, DatasetReport]:
    """Like :func:`write_dataset`, also returning what the target format could not hold."""
    module = _module(format)
    check_split_name(split)
    check_image_mode(images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir, module.write(dataset, out_dir, split, images)


def write_dataset(
    dataset: DetectionDataset, out_dir: str | Path, format: str, split: str = "train", images: str = "copy"
) -> Path:
    """Write ``dataset`` as split ``split`` of ``out_dir`` in ``format`` and return ``out_dir``.

    Images are copied (``images="copy"``) or linked (``"link"``: a hard link, or a symlink across
    file systems). Calling it again with another split adds that split to the same directory; a
    split that is already there is an error, never overwritten. What the target format cannot
    express (e.g. KITTI's 3D fields in COCO) is not written and announced with a
    :class:`DatasetWriteWarning`; :func:`write_split` returns it as a report instead.
    """
    out_dir, losses = write_split(dataset, out_dir, format, split, images)
    if losses.counts:
        warnings.warn(
            f"writing {dataset.name} as {format}: " + "; ".join(f"{n} x {r}" for r, n in losses.counts.items()),
            DatasetWriteWarning,
            stacklevel=2,
        )
    return out_dir


__all__ = [
    "FORMATS", "LAYOUTS", "DatasetWriteWarning", "detect_format", "list_splits", "load_dataset",
    "resolve_format", "write_dataset", "write_split",
]
