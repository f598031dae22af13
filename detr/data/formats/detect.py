"""Which format a dataset path is in, from its layout alone (no file is parsed).

Rules (names compared case-sensitively, so ``annotations/`` and ``Annotations/`` differ even on
case-insensitive file systems):

* a ``.json`` file -> COCO; a ``.yaml``/``.yml`` or ``.data`` file -> YOLO (its ``data.yaml`` or
  Darknet ``obj.data``);
* ``annotations/`` holding ``*.json`` -> COCO;
* ``Annotations/`` -> VOC;
* ``data.yaml``, ``obj.data``, or ``images/`` next to ``labels/`` -> YOLO;
* ``label_2/``, or a subdirectory holding ``label_2/`` -> KITTI.

No match, or more than one, is an error that lists the layouts and asks for an explicit format.
Formats read through Datumaro or a plugin are never guessed: name them (``datumaro:cvat``).
"""

from __future__ import annotations

from pathlib import Path

from detr.errors import DatasetFormatError

LAYOUTS = {
    "coco": "annotations/<split>.json + images/<split>/ (or a .json file)",
    "voc": "Annotations/*.xml + JPEGImages/ + ImageSets/Main/<split>.txt",
    "yolo": "data.yaml (or classes.txt) + images/<split>/ + labels/<split>/*.txt, or Darknet obj.data + obj.names",
    "kitti": "<split>/image_2/ + <split>/label_2/*.txt",
}


def _entries(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def detect_format(path: Path) -> str:
    """"coco", "voc", "yolo" or "kitti" for ``path`` (see the module docstring)."""
    if not path.exists():
        raise DatasetFormatError(f"{path}: dataset path not found")
    if path.is_file():
        if path.suffix == ".json":
            return "coco"
        if path.suffix in (".yaml", ".yml", ".data"):
            return "yolo"
        raise DatasetFormatError(
            f"{path}: cannot tell the format of a {path.suffix or 'suffix-less'} file; give a COCO .json, "
            "a YOLO data.yaml or obj.data, or a dataset directory"
        )
    names = _entries(path)
    found = []
    if "annotations" in names and any((path / "annotations").glob("*.json")):
        found.append("coco")
    if "Annotations" in names:
        found.append("voc")
    if "data.yaml" in names or "obj.data" in names or {"images", "labels"} <= names:
        found.append("yolo")
    if "label_2" in names or any((path / n / "label_2").is_dir() for n in names):
        found.append("kitti")
    if len(found) == 1:
        return found[0]
    layouts = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    if not found:
        raise DatasetFormatError(
            f"{path}: no known dataset layout found (expected one of {layouts}); for other formats pass "
            "format='datumaro:<fmt>', a plugin name or 'package.module:Class'"
        )
    raise DatasetFormatError(
        f"{path}: the layout fits several formats {found}; pass the format explicitly (one of {list(LAYOUTS)})"
    )
