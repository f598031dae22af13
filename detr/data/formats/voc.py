"""Pascal VOC XML: reading and writing.

Layout::

    <root>/Annotations/<id>.xml          one file per image (parsed with defusedxml)
    <root>/JPEGImages/<filename>         the image named by the XML's <filename> (default <id>.jpg)
    <root>/ImageSets/Main/<split>.txt    image ids of a split, one per line
    <root>/labels.txt                    optional: class names, one per line, in label-id order

Splits are the ``ImageSets/Main/*.txt`` lists, except the per-class lists ``<class>_<split>.txt``
(recognized because ``<split>.txt`` exists too). ``split=None`` reads every image listed in any
split once (VOC's ``trainval`` repeats ``train`` and ``val``, so the lists are united, not
concatenated), or every ``Annotations/*.xml`` when there are no lists.

Class order: ``labels.txt`` when present (a name not in it is an error); else all 20 standard VOC
classes in their usual order when every name is a VOC class (the full list, so every split of a
VOC dataset gets the same label map even when a split lacks a class); else the names present,
sorted. The writer always writes ``labels.txt`` so a round trip keeps the order.

Coordinates: VOC pixel indices are 1-based and inclusive, so ``xmin = 1, xmax = width`` covers the
whole image; records get ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax`` (the convention of
Detectron2) and the writer adds the 1 back. A 0-based file (``xmin = 0``) therefore lies 1 px
outside the image: set ``data.repair.clip_boxes_px: 1`` to accept it. ``difficult``, ``truncated``
and ``occluded`` (0/1, absent = 0) are box attributes; a ``pose`` other than "Unspecified" is kept in
``extras`` (``voc_pose``).
Not carried (counted in the report's notes): ``<part>`` elements (person layout), image-level
``<source>``, ``<owner>``, ``<segmented>``. Writing: the XML and id are named by the record's image
id when it is a plain string (a VOC id), else by the image file stem.
"""

from __future__ import annotations

import filecmp
import xml.etree.ElementTree as ET  # writing our own XML only; every file read goes through defusedxml
from pathlib import Path

import defusedxml.ElementTree as SafeET
import numpy as np
from defusedxml import DefusedXmlException
from tqdm import tqdm

from detr.data.dataset import DatasetReport, DetectionDataset, ReportBuilder
from detr.data.formats.writing import (
    LossCounter,
    directory_label_map,
    float32_text,
    number,
    place_image,
    refuse_existing,
    shortest_decimals,
    unique_file_names,
)
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.validate import BoxChecker, check_image_size, check_unique, read_text
from detr.errors import DatasetFormatError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
LABELS_FILE = "labels.txt"


# ---------------------------------------------------------------------------------------------
# splits and class names (shared with KITTI's labels.txt)
# ---------------------------------------------------------------------------------------------


def list_splits(root: Path) -> list[str]:
    folder = root / "ImageSets" / "Main"
    if not folder.is_dir():
        return []
    stems = {p.stem for p in folder.glob("*.txt")}
    return sorted(s for s in stems if not ("_" in s and s.split("_", 1)[1] in stems))


def read_labels_file(path: Path) -> LabelMap | None:
    """Class names from ``labels.txt`` (one per line, blank lines ignored), or None if absent."""
    if not path.is_file():
        return None
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not names:
        raise DatasetFormatError(f"{path}: no class names (expected one name per line)")
    return LabelMap(tuple(names))


def write_labels_file(path: Path, label_map: LabelMap) -> LabelMap:
    """Write ``labels.txt`` unless a split written before left one; returns the map in force
    (see :func:`~detr.data.formats.writing.directory_label_map`)."""
    existing = read_labels_file(path)
    label_map = directory_label_map(existing, label_map, path)
    if existing is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{name}\n" for name in label_map.names), encoding="utf-8")
    return label_map


def _ids_of_list(path: Path) -> list[str]:
    ids, where = [], []
    for line_no, line in enumerate(read_text(path).splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 1:
            raise DatasetFormatError(f"{path}:{line_no}: expected one image id per line, got {line!r}")
        ids.append(tokens[0])
        where.append(f"{path}:{line_no}")
    check_unique(ids, where, "image id")
    return ids


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def read(
    root: Path, split: str | None, *, checker: BoxChecker, report: ReportBuilder, check_images: bool
) -> DetectionDataset:
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise DatasetFormatError(f"{root}: no Annotations/ directory (expected a VOC layout)")
    splits = list_splits(root)
    lists = root / "ImageSets" / "Main"
    if split is not None:
        if split not in splits:
            raise DatasetFormatError(
                f"{root}: no VOC split {split!r} ({lists}/{split}.txt); available splits: {splits}"
            )
        ids = _ids_of_list(lists / f"{split}.txt")
    elif splits:
        ids = list(dict.fromkeys(i for s in splits for i in _ids_of_list(lists / f"{s}.txt")))
    else:
        ids = sorted(p.stem for p in annotations.glob("*.xml"))

    parsed = [
        _parse(annotations / f"{image_id}.xml", image_id, root, report)
        for image_id in tqdm(ids, desc=f"reading {root.name}", unit="xml", disable=None, leave=False)
    ]
    check_unique([p["path"] for p in parsed], [p["source"] for p in parsed], "image file")
    label_map = _label_map(root, [n for p in parsed for n in p["names"]])
    records = [_record(p, label_map, checker) for p in parsed]
    if check_images:
        for record in records:
            check_image_size(record.image_path, record.width, record.height, referenced_by=record.source)
    return DetectionDataset(tuple(records), label_map, f"{root.name}:{split or 'all'}", "voc")


def _label_map(root: Path, names: list[str]) -> LabelMap:
    given = read_labels_file(root / LABELS_FILE)
    if given is not None:
        return given
    present = set(names)
    if present <= set(VOC_CLASSES):
        return LabelMap(VOC_CLASSES)
    return LabelMap(tuple(sorted(present)))


def _text(element, tag: str, where: str, *, required: bool = True, default: str | None = None) -> str | None:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise DatasetFormatError(f"{where}: missing <{tag}>")
        return default
    return child.text.strip()


def _int(text: str, where: str, tag: str, allowed: tuple[int, ...] | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DatasetFormatError(f"{where}: <{tag}> must be an integer, got {text!r}") from None
    if allowed is not None and value not in allowed:
        raise DatasetFormatError(f"{where}: <{tag}> must be one of {list(allowed)}, got {value}")
    return value


def _float(text: str, where: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DatasetFormatError(f"{where}: <{tag}> must be a number, got {text!r}") from None


def _parse(path: Path, image_id: str, root: Path, report: ReportBuilder) -> dict:
    """The fields of one XML as plain values (labels are resolved once all names are known)."""
    try:
        tree = SafeET.parse(path)
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: annotation file not found (listed for image id {image_id!r})") from None
    except OSError as e:
        raise DatasetFormatError(f"{path}: cannot read annotation file ({e.strerror})") from None
    except SafeET.ParseError as e:
        line, column = e.position
        raise DatasetFormatError(f"{path}:{line}:{column}: not valid XML ({e})") from None
    except DefusedXmlException as e:
        raise DatasetFormatError(f"{path}: refused unsafe XML ({e})") from None
    node = tree.getroot()
    where = str(path)
    if node.tag != "annotation":
        raise DatasetFormatError(f"{where}: root element must be <annotation>, got <{node.tag}>")
    size = node.find("size")
    if size is None:
        raise DatasetFormatError(f"{where}: missing <size> (width and height are required)")
    width = _int(_text(size, "width", f"{where}: <size>"), where, "width")
    height = _int(_text(size, "height", f"{where}: <size>"), where, "height")
    if width <= 0 or height <= 0:
        raise DatasetFormatError(f"{where}: image size must be positive, got {width}x{height}")
    for tag in ("source", "owner", "segmented"):
        if node.find(tag) is not None:
            report.note(f"VOC <{tag}> is not carried")
    filename = _text(node, "filename", where, required=False, default=f"{image_id}.jpg")

    names, boxes, difficult, truncated, occluded, poses, sources = [], [], [], [], [], [], []
    for j, obj in enumerate(node.findall("object")):
        at = f"{where}: object[{j}]"
        names.append(_text(obj, "name", at))
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetFormatError(f"{at}: missing <bndbox>")
        boxes.append([_float(_text(bndbox, t, f"{at}: <bndbox>"), at, t) for t in ("xmin", "ymin", "xmax", "ymax")])
        difficult.append(_int(_text(obj, "difficult", at, required=False, default="0"), at, "difficult", (0, 1)))
        truncated.append(_int(_text(obj, "truncated", at, required=False, default="0"), at, "truncated", (0, 1)))
        occluded.append(_int(_text(obj, "occluded", at, required=False, default="0"), at, "occluded", (0, 1)))
        poses.append(_text(obj, "pose", at, required=False))
        if obj.find("part") is not None:
            report.add("not carried: VOC <part> elements of an object", at)
        sources.append(f"{at} ({names[-1]})")
    return {
        "image_id": image_id, "path": root / "JPEGImages" / filename, "width": width, "height": height,
        "names": names, "boxes": boxes, "difficult": difficult, "truncated": truncated,
        "occluded": occluded, "poses": poses, "sources": sources, "source": where,
    }


def _record(p: dict, label_map: LabelMap, checker: BoxChecker) -> ImageRecord:
    labels = np.array([label_map.id_of(n, where=s) for n, s in zip(p["names"], p["sources"], strict=True)], np.int64)
    xyxy = np.asarray(p["boxes"], dtype=np.float64).reshape(-1, 4)
    xyxy[:, :2] -= 1.0  # 1-based inclusive pixel indices -> 0-based continuous coordinates
    boxes, keep = checker.check(xyxy, p["width"], p["height"], p["sources"])
    poses = np.empty(len(p["poses"]), dtype=object)
    poses[:] = p["poses"]
    return ImageRecord(
        image_path=p["path"],
        width=p["width"],
        height=p["height"],
        boxes=boxes,
        labels=labels[keep],
        box_sources=tuple(s for s, k in zip(p["sources"], keep, strict=True) if k),
        source=p["source"],
        image_id=p["image_id"],
        attributes={
            "difficult": np.asarray(p["difficult"], np.bool_)[keep],
            "truncated": np.asarray(p["truncated"], np.float32)[keep],
            "occluded": np.asarray(p["occluded"], np.int64)[keep],
        },
        # pose only when it says something: "Unspecified" is what the writer writes by default
        extras={"voc_pose": poses[keep]} if any(p not in (None, "Unspecified") for p in poses) else {},
    )


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _voc_id(record: ImageRecord) -> str:
    image_id = record.image_id
    if isinstance(image_id, str) and image_id and not any(c in image_id for c in "/\\") and image_id not in (".", ".."):
        return image_id
    return record.image_path.stem


def write(dataset: DetectionDataset, out_dir: Path, split: str, images: str) -> DatasetReport:
    """Write the XMLs, ``JPEGImages/``, ``ImageSets/Main/<split>.txt`` and ``labels.txt``."""
    list_path = out_dir / "ImageSets" / "Main" / f"{split}.txt"
    refuse_existing(list_path, split)
    file_names = unique_file_names(dataset, split)
    ids = [_voc_id(r) for r in dataset.records]
    check_unique(ids, [str(r.image_path) for r in dataset.records], "VOC image id")
    losses = LossCounter("VOC", attributes=("difficult", "truncated", "occluded"), extras_prefix="voc_")
    report = ReportBuilder()
    write_labels_file(out_dir / LABELS_FILE, dataset.label_map)
    (out_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    for record, image_id, file_name in zip(dataset.records, ids, file_names, strict=True):
        losses.visit(record)
        xml_path = out_dir / "Annotations" / f"{image_id}.xml"
        tree = _xml(record, file_name, dataset.label_map, report)
        ET.indent(tree)
        text = ET.tostring(tree.getroot(), encoding="unicode") + "\n"
        image_path = out_dir / "JPEGImages" / file_name
        if xml_path.exists():
            # VOC splits share Annotations/ and JPEGImages/ (trainval = train + val): the same image
            # written again by another split is fine, a different one under the same id is not.
            if xml_path.read_text(encoding="utf-8") != text or not _same_file(record.image_path, image_path):
                raise DatasetFormatError(
                    f"{xml_path} already exists with other content; image id {image_id!r} names two "
                    "different images"
                )
            continue
        xml_path.write_text(text, encoding="utf-8")
        place_image(record.image_path, image_path, images)
    list_path.parent.mkdir(parents=True, exist_ok=True)
    list_path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    report.extend(losses.build())
    return report.build()


def _same_file(a: Path, b: Path) -> bool:
    return b.is_file() and a.is_file() and filecmp.cmp(a, b, shallow=False)


def _flag(record: ImageRecord, name: str, report: ReportBuilder) -> np.ndarray:
    """A VOC 0/1 flag from an attribute; KITTI's graded values (truncation 0..1, occlusion 0..3)
    become 1 when above 0, and that change is counted."""
    values = record.attributes.get(name)
    if values is None:
        return np.zeros(record.num_boxes, np.int64)
    graded = (values != 0) & (values != 1)
    if graded.any():
        idx = np.flatnonzero(graded)
        report.add(f"changed: {name} levels above 0 written as VOC flag 1",
                   [record.box_sources[i] for i in idx[:3]], count=len(idx))
    return (values > 0).astype(np.int64)


def _xml(record: ImageRecord, file_name: str, label_map: LabelMap, report: ReportBuilder) -> ET.ElementTree:
    node = ET.Element("annotation")
    ET.SubElement(node, "folder").text = "JPEGImages"
    ET.SubElement(node, "filename").text = file_name
    size = ET.SubElement(node, "size")
    ET.SubElement(size, "width").text = str(record.width)
    ET.SubElement(size, "height").text = str(record.height)
    ET.SubElement(size, "depth").text = "3"
    boxes = record.boxes.astype(np.float64)
    # xmin/ymin are written 1-based; pick the fewest decimals that read back to the same float32.
    corners = shortest_decimals(boxes[:, :2] + 1.0, lambda c: (c - 1.0).astype(np.float32) == record.boxes[:, :2])
    far = float32_text(record.boxes[:, 2:])
    difficult = record.attributes.get("difficult", np.zeros(record.num_boxes, bool)).astype(np.int64)
    truncated = _flag(record, "truncated", report)
    occluded = _flag(record, "occluded", report)
    poses = record.extras.get("voc_pose")
    for j in range(record.num_boxes):
        obj = ET.SubElement(node, "object")
        ET.SubElement(obj, "name").text = label_map.name_of(int(record.labels[j]))
        ET.SubElement(obj, "pose").text = (poses[j] if poses is not None and poses[j] else "Unspecified")
        ET.SubElement(obj, "truncated").text = str(truncated[j])
        ET.SubElement(obj, "occluded").text = str(occluded[j])
        ET.SubElement(obj, "difficult").text = str(difficult[j])
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (*corners[j], *far[j]), strict=True):
            ET.SubElement(bndbox, tag).text = number(value)
    return ET.ElementTree(node)
