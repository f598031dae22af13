"""Where a YOLO dataset keeps its class names, splits, images and labels.

Four layouts are recognised, the ones Ultralytics (and Darknet) read:

* **Ultralytics** ``data.yaml``: ``names`` (list, or dict {id: name}), optional ``nc`` and ``path``,
  one entry per split (a directory, a ``.txt`` list of image paths, or a list of those). Entries
  are relative to ``path`` (itself relative to the YAML's folder) or to the YAML's folder. As
  Ultralytics does, an entry starting with ``../`` that does not exist there is retried without
  the ``../`` -- the form Roboflow exports (``train: ../train/images``, ``val: ../valid/images``
  next to ``train/``, ``valid/``).
* **data.yaml without split entries** (supervision's ``as_yolo`` writes only ``nc`` and ``names``):
  the splits are the subdirectories of ``images/``.
* **No data.yaml**: class names from ``classes.txt`` (one per line), splits from ``images/<split>/``.
* **Darknet** ``obj.data`` (as Datumaro's ``yolo`` format and CVAT write it): ``names = obj.names``,
  one ``<split> = <split>.txt`` line per split listing image paths, ``classes = K``. Paths are
  relative to the dataset folder; Darknet's ``data/`` prefix (the folder's name when Darknet runs
  from its own root) is retried without it.

The label file of an image is found as Ultralytics does: the last ``images`` folder of its path
replaced by ``labels`` and the suffix by ``.txt``; when the path has no ``images`` folder (Darknet's
``obj_train_data/``), the label lies next to the image. Every path that was looked for and not
found is named in the error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from detr.data.labelmap import LabelMap
from detr.data.validate import read_text
from detr.errors import DatasetFormatError

CONFIG_FILE = "data.yaml"
DARKNET_FILE = "obj.data"
CLASSES_FILE = "classes.txt"
NON_SPLIT_KEYS = frozenset({"path", "names", "nc", "download", "kpt_shape", "flip_idx", "channels", "yaml_file"})
DARKNET_NON_SPLIT_KEYS = frozenset({"classes", "names", "backup", "eval", "results"})
DARKNET_PREFIX = "data/"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class Entry:
    """One split entry: the path used (the first that exists) and every path that was tried."""

    path: Path
    tried: tuple[Path, ...]

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def describe_missing(self) -> str:
        return "not found (looked for " + ", ".join(str(p) for p in self.tried) + ")"


@dataclass(frozen=True)
class Layout:
    """A YOLO dataset's layout. ``kind``: "ultralytics", "folders" (no split entries) or "darknet"."""

    root: Path
    config_path: Path | None
    kind: str
    label_map: LabelMap
    splits: dict[str, list[Entry]]

    @property
    def where(self) -> str:
        return str(self.config_path or self.root / "images")


def _first_existing(candidates: list[Path]) -> Entry:
    # ``..`` is folded lexically (as Ultralytics' ``resolve`` does, without following symlinks)
    candidates = list(dict.fromkeys(Path(os.path.normpath(p)) for p in candidates))
    for path in candidates:
        if path.exists():
            return Entry(path, tuple(candidates))
    return Entry(candidates[0], tuple(candidates))


def find_config(path: Path) -> tuple[Path, Path | None]:
    """(dataset root, data.yaml / obj.data or None) for a dataset folder or a config file."""
    if path.is_file():
        return path.parent, path
    for name in (CONFIG_FILE, DARKNET_FILE):
        if (path / name).is_file():
            return path, path / name
    return path, None


def read_layout(path: Path) -> Layout:
    root, config_path = find_config(path)
    if config_path is not None and config_path.suffix == ".data":
        return _darknet(root, config_path)
    config = _yaml(config_path) if config_path is not None else {}
    if config_path is not None:
        label_map = _yaml_label_map(config_path, config)
        splits = _yaml_splits(config_path, config)
        if splits:
            return Layout(root, config_path, "ultralytics", label_map, splits)
    else:
        label_map = _classes_txt(root)
    folder = root / "images"
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    splits = {p.name: [Entry(p, (p,))] for p in subdirs}
    return Layout(root, config_path, "folders", label_map, splits)


# ---------------------------------------------------------------------------------------------
# Ultralytics data.yaml
# ---------------------------------------------------------------------------------------------


def _yaml(config_path: Path) -> dict:
    try:
        config = yaml.safe_load(read_text(config_path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise DatasetFormatError(f"{config_path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(config, dict):
        raise DatasetFormatError(f"{config_path}: expected a mapping with 'names' and split entries")
    return config


def yaml_config(config_path: Path) -> dict:
    """The content of an existing ``data.yaml`` (for the writer, which adds a split to it)."""
    return _yaml(config_path)


def names_of(config_path: Path, names) -> LabelMap:
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DatasetFormatError(
                f"{config_path}: 'names' keys must be the class ids 0..{len(keys) - 1}, got {keys}"
            )
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DatasetFormatError(f"{config_path}: 'names' must be a list of class names or a dict id -> name")
    return LabelMap(tuple(names))


def _yaml_label_map(config_path: Path, config: dict) -> LabelMap:
    if "names" not in config:
        raise DatasetFormatError(f"{config_path}: missing 'names' (the class names)")
    label_map = names_of(config_path, config["names"])
    if "nc" in config and config["nc"] != len(label_map):
        raise DatasetFormatError(f"{config_path}: nc = {config['nc']!r} but 'names' lists {len(label_map)} classes")
    return label_map


def _yaml_splits(config_path: Path, config: dict) -> dict[str, list[Entry]]:
    base = config_path.parent
    if isinstance(config.get("path"), str):
        base = base / config["path"]
    splits: dict[str, list[Entry]] = {}
    for key, value in config.items():
        if key in NON_SPLIT_KEYS or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            continue  # e.g. Roboflow's `roboflow: {workspace: ..., url: ...}` block
        splits[str(key)] = [_entry(base, v) for v in values]
    return splits


def _entry(base: Path, value: str) -> Entry:
    """Ultralytics' rule: ``base / value``; a missing ``../x`` is retried as ``base / x``."""
    candidates = [base / value]
    if value.startswith("../"):
        candidates.append(base / value[3:])
    return _first_existing(candidates)


def _classes_txt(root: Path) -> LabelMap:
    classes = root / CLASSES_FILE
    if not classes.is_file():
        raise DatasetFormatError(
            f"{root}: no {CONFIG_FILE}, {DARKNET_FILE} or {CLASSES_FILE} with the class names "
            f"(looked for {root / CONFIG_FILE}, {root / DARKNET_FILE}, {classes})"
        )
    names = [line.strip() for line in read_text(classes).splitlines() if line.strip()]
    return LabelMap(tuple(names))


# ---------------------------------------------------------------------------------------------
# Darknet obj.data
# ---------------------------------------------------------------------------------------------


def _darknet_path(root: Path, value: str) -> Entry:
    candidates = [root / value]
    if value.startswith(DARKNET_PREFIX):
        candidates.append(root / value[len(DARKNET_PREFIX):])
    return _first_existing(candidates)


def _darknet(root: Path, config_path: Path) -> Layout:
    fields: dict[str, tuple[str, int]] = {}
    for line_no, line in enumerate(read_text(config_path).splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        key, sep, value = text.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DatasetFormatError(f"{config_path}:{line_no}: expected 'key = value', got {line.strip()!r}")
        fields[key.strip()] = (value.strip(), line_no)
    if "names" not in fields:
        raise DatasetFormatError(f"{config_path}: missing 'names = <file>' (the class names file, e.g. obj.names)")
    names_entry = _darknet_path(root, fields["names"][0])
    if not names_entry.path.is_file():
        raise DatasetFormatError(
            f"{config_path}:{fields['names'][1]}: class names file {names_entry.describe_missing()}"
        )
    names = [line.strip() for line in read_text(names_entry.path).splitlines() if line.strip()]
    label_map = LabelMap(tuple(names))
    if "classes" in fields:
        value, line_no = fields["classes"]
        if value != str(len(names)):
            raise DatasetFormatError(
                f"{config_path}:{line_no}: classes = {value} but {names_entry.path} lists {len(names)} names"
            )
    splits = {
        key: [_darknet_path(root, value)]
        for key, (value, _) in fields.items()
        if key not in DARKNET_NON_SPLIT_KEYS
    }
    return Layout(root, config_path, "darknet", label_map, splits)


# ---------------------------------------------------------------------------------------------
# images and labels of an entry
# ---------------------------------------------------------------------------------------------


def label_path(image: Path) -> Path:
    """``.../images/x/a.jpg`` -> ``.../labels/x/a.txt`` (the last ``images`` folder is replaced);
    without an ``images`` folder, ``a.txt`` next to the image (Darknet)."""
    parts = list(image.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def label_dir(entry: Path) -> Path:
    """The folder holding the labels of the images in the image folder ``entry``."""
    return label_path(entry / "x.jpg").parent


def images_of(entry: Entry, where: str, root: Path) -> list[Path]:
    """The image files of an entry: a folder (searched recursively) or a ``.txt`` list of paths.

    List lines are relative to the list's folder (Ultralytics) or to the dataset root, with
    Darknet's ``data/`` prefix retried without it; a listed image that exists under none of those
    is an error naming every path tried.
    """
    if not entry.exists:
        raise DatasetFormatError(f"{where}: split entry {entry.describe_missing()}")
    path = entry.path
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if path.suffix != ".txt":
        raise DatasetFormatError(f"{where}: {path} is neither an image folder nor a .txt list of images")
    images = []
    for line_no, line in enumerate(read_text(path).splitlines(), 1):
        value = line.strip()
        if not value:
            continue
        candidates = [Path(value)] if Path(value).is_absolute() else [path.parent / value, root / value]
        if value.startswith(DARKNET_PREFIX):
            candidates.append(root / value[len(DARKNET_PREFIX):])
        found = _first_existing(candidates)
        if not found.exists:
            raise DatasetFormatError(f"{path}:{line_no}: image {value!r} {found.describe_missing()}")
        images.append(found.path)
    return images


def has_labels(entry: Entry) -> bool:
    """Whether a split entry can hold labels (an unlabelled ``test`` folder cannot)."""
    if not entry.exists:
        return False
    if entry.path.is_dir():
        return label_dir(entry.path).is_dir()
    return entry.path.is_file()
