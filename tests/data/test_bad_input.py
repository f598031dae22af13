"""Every kind of bad input, in every format that can express it, is a DatasetFormatError naming the
file and line/object; the repair policy turns the repairable ones into counted repairs.

Not expressible, hence not tested: an annotated size that disagrees with the image in YOLO and
KITTI (their labels carry no image size; the size is read from the image), an unknown YOLO class
*name* (labels hold ids; an id out of range is tested), duplicate image ids in YOLO/KITTI other than
two images with one stem (ids are file stems).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detr.config import RepairPolicy
from detr.data import load_dataset
from detr.errors import DatasetFormatError

# ---------------------------------------------------------------------------------------------
# how to break each fixture
# ---------------------------------------------------------------------------------------------


def coco_edit(fn):
    def apply(root: Path) -> None:
        path = root / "annotations" / "train.json"
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))
    return apply


def set_bbox(i, bbox):
    return coco_edit(lambda d: d["annotations"][i].__setitem__("bbox", bbox))


def voc_object(xmin=1, ymin=1, xmax=64, ymax=48, name="dog", extra=""):
    """Rewrite 000001.xml with one object (a 64x48 image)."""
    def apply(root: Path) -> None:
        (root / "Annotations" / "000001.xml").write_text(
            "<annotation><filename>000001.jpg</filename><size><width>64</width><height>48</height></size>"
            f"<object><name>{name}</name>{extra}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object></annotation>"
        )
    return apply


def write_text(relative: str, text: str | bytes):
    def apply(root: Path) -> None:
        path = root / relative
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return apply


def unlink(relative: str):
    return lambda root: (root / relative).unlink()


def copy_image(src: str, dst: str):
    return lambda root: (root / dst).write_bytes((root / src).read_bytes())


def both(*steps):
    def apply(root: Path) -> None:
        for step in steps:
            step(root)
    return apply


KITTI_PED = "Pedestrian 0.00 0 -0.20 {} 1.89 0.48 1.20 1.84 1.47 8.41 0.01"  # 120x40 image


def kitti_line(text: str):
    return write_text("training/label_2/000000.txt", text + "\n")


# (format, case id, how to break the fixture, regex the message must match)
CASES = [
    # ---- COCO -------------------------------------------------------------------------------
    ("coco", "malformed json", write_text("annotations/train.json", '{"images": ['),
     r"train\.json:1:\d+: not valid JSON"),
    ("coco", "missing field", coco_edit(lambda d: d["annotations"][1].pop("bbox")),
     r"train\.json: annotations\[1\] \(id=101\): missing 'bbox'"),
    ("coco", "wrong field count", set_bbox(1, [1, 2, 3]), r"annotations\[1\] \(id=101\): 'bbox' must be 4 numbers"),
    ("coco", "non-number", set_bbox(1, [1, "2", 3, 4]), r"annotations\[1\] \(id=101\): 'bbox' must be 4 numbers"),
    ("coco", "non-number image size", coco_edit(lambda d: d["images"][1].__setitem__("width", "80")),
     r"train\.json: images\[1\] must have .* integer 'width'"),
    ("coco", "box outside", set_bbox(0, [60, 0, 10, 10]),
     r"train\.json: annotations\[0\] \(id=100\): box .* lies 6 px outside the 64x48 image"),
    ("coco", "zero-area box", set_bbox(0, [2, 3, 0, 20]), r"annotations\[0\] \(id=100\): zero-area box"),
    ("coco", "inverted box", set_bbox(0, [2, 3, -1, 20]), r"annotations\[0\] \(id=100\): inverted box"),
    ("coco", "unknown class", coco_edit(lambda d: d["annotations"][0].__setitem__("category_id", 99)),
     r"annotations\[0\] \(id=100\): category_id 99 is not in categories \(ids \[3, 1, 7\]\)"),
    ("coco", "unknown image", coco_edit(lambda d: d["annotations"][2].__setitem__("image_id", 999)),
     r"annotations\[2\] \(id=102\): image_id 999 is not the id of any entry in images"),
    ("coco", "missing image", unlink("images/train/b.jpg"),
     r"train\.json: images\[1\] \(id=11\): image file .*b\.jpg not found"),
    ("coco", "unreadable image", write_text("images/train/b.jpg", b"not an image"),
     r"train\.json: images\[1\] \(id=11\): cannot read image .*b\.jpg"),
    ("coco", "size disagrees", coco_edit(lambda d: d["images"][1].__setitem__("width", 81)),
     r"images\[1\] \(id=11\): annotated image size 81x60 does not match the file .*b\.jpg \(80x60\)"),
    ("coco", "duplicate image id", coco_edit(lambda d: d["images"][1].__setitem__("id", 10)),
     r"train\.json: images\[1\]: duplicate image id 10 \(first at .*images\[0\]\)"),
    ("coco", "duplicate file name", coco_edit(lambda d: d["images"][1].__setitem__("file_name", "a.jpg")),
     r"images\[1\]: duplicate image file_name 'a\.jpg'"),
    ("coco", "duplicate annotation id", coco_edit(lambda d: d["annotations"][3].__setitem__("id", 100)),
     r"annotations\[3\]: duplicate annotation id 100"),
    # ---- VOC --------------------------------------------------------------------------------
    ("voc", "malformed xml", write_text("Annotations/000001.xml", "<annotation><size></annotation>"),
     r"000001\.xml:1:\d+: not valid XML"),
    ("voc", "missing field", write_text("Annotations/000001.xml", "<annotation><size><width>64</width>"
                                        "<height>48</height></size><object><name>dog</name></object></annotation>"),
     r"000001\.xml: object\[0\]: missing <bndbox>"),
    ("voc", "non-number", voc_object(xmin="abc"), r"000001\.xml: object\[0\]: <xmin> must be a number, got 'abc'"),
    ("voc", "bad flag", voc_object(extra="<difficult>2</difficult>"),
     r"000001\.xml: object\[0\]: <difficult> must be one of \[0, 1\], got 2"),
    ("voc", "box outside", voc_object(xmax=70),
     r"000001\.xml: object\[0\] \(dog\): box .* lies 6 px outside the 64x48"),
    ("voc", "zero-area box", voc_object(xmin=11, xmax=10), r"000001\.xml: object\[0\] \(dog\): zero-area box"),
    ("voc", "inverted box", voc_object(xmin=30, xmax=20), r"000001\.xml: object\[0\] \(dog\): inverted box"),
    ("voc", "unknown class", write_text("labels.txt", "cat\ndog\n"),
     r"000001\.xml: object\[1\] \(person\): unknown class 'person'; known classes: \['cat', 'dog'\]"),
    ("voc", "missing image", unlink("JPEGImages/000002.jpg"), r"000002\.xml: image file .*000002\.jpg not found"),
    ("voc", "unreadable image", write_text("JPEGImages/000002.jpg", b"\x89PNG broken"),
     r"000002\.xml: cannot read image .*000002\.jpg"),
    ("voc", "size disagrees", write_text("Annotations/000002.xml", "<annotation><size><width>51</width>"
                                         "<height>40</height></size></annotation>"),
     r"000002\.xml: annotated image size 51x40 does not match the file .*000002\.jpg \(50x40\)"),
    ("voc", "duplicate image id", write_text("ImageSets/Main/train.txt", "000001\n000002\n000001\n"),
     r"train\.txt:3: duplicate image id '000001' \(first at .*train\.txt:1\)"),
    ("voc", "duplicate file name", write_text("Annotations/000002.xml", "<annotation><filename>000001.jpg</filename>"
                                              "<size><width>64</width><height>48</height></size></annotation>"),
     r"000002\.xml: duplicate image file .*000001\.jpg"),
    ("voc", "missing annotation", write_text("ImageSets/Main/train.txt", "000001\n000009\n"),
     r"000009\.xml: annotation file not found \(listed for image id '000009'\)"),
    # ---- YOLO -------------------------------------------------------------------------------
    ("yolo", "malformed yaml", write_text("data.yaml", "names: [a, b\n"), r"data\.yaml:\d+: not valid YAML"),
    ("yolo", "wrong field count", write_text("labels/train/p.txt", "0 0.5 0.5 0.2\n"),
     r"p\.txt:1: expected 5 fields 'class cx cy w h', got 4"),
    ("yolo", "non-number", write_text("labels/train/p.txt", "0 0.5 0.5 0.2 0.4\n0 0.5 abc 0.2 0.4\n"),
     r"p\.txt:2: cx cy w h must be numbers"),
    ("yolo", "non-integer class", write_text("labels/train/p.txt", "0.0 0.5 0.5 0.2 0.4\n"),
     r"p\.txt:1: class id must be an integer, got '0\.0'"),
    ("yolo", "box outside", write_text("labels/train/p.txt", "0 0.95 0.5 0.2 0.4\n"),
     r"labels/train/p\.txt:1 \(image p\.jpg 100x50\): normalized \(cx, cy, w, h\) = \(0\.95, 0\.5, 0\.2, 0\.4\)"
     r" -> box .* lies 5 px outside"),
    ("yolo", "zero-area box", write_text("labels/train/p.txt", "0 0.5 0.5 0 0.4\n"),
     r"p\.txt:1 \(image p\.jpg 100x50\): zero-area"),
    ("yolo", "inverted box", write_text("labels/train/p.txt", "0 0.5 0.5 -0.2 0.4\n"),
     r"p\.txt:1 \(image p\.jpg 100x50\): inverted"),
    ("yolo", "unknown class", write_text("labels/train/p.txt", "2 0.5 0.5 0.2 0.4\n"),
     r"p\.txt:1: class id 2 out of range; the dataset has 2 classes \(ids 0\.\.1\)"),
    ("yolo", "missing image", unlink("images/train/p.jpg"),
     r"labels/train/p\.txt: label file without an image in the split \(looked for /\S+/images/train/p\.\{bmp,jpeg,jpg,png"),
    ("yolo", "unreadable image", write_text("images/train/p.jpg", b"GIF89a broken"), r"cannot read image .*p\.jpg"),
    ("yolo", "duplicate file name", copy_image("images/train/q.png", "images/train/p.png"),
     r"duplicate label file \(two images share a stem\) .*p\.txt"),
    # ---- KITTI ------------------------------------------------------------------------------
    ("kitti", "wrong field count", kitti_line("Car 0 0 0 1 2 3 4 1 1 1 0 0 0"),
     r"000000\.txt:1: expected 15 fields .* got 14"),
    ("kitti", "non-number", kitti_line("Car 0 0 x 1 2 3 4 1 1 1 0 0 0 0"),
     r"000000\.txt:1: field 'alpha' must be a number, got 'x'"),
    ("kitti", "bad occlusion", kitti_line("Car 0 5 0 1 2 3 4 1 1 1 0 0 0 0"),
     r"000000\.txt:1: occluded must be 0, 1, 2 or 3, got '5'"),
    ("kitti", "box outside", kitti_line(KITTI_PED.format("71.00 5.00 125.00 38.00")),
     r"000000\.txt:1 \(Pedestrian\): box .* lies 5 px outside the 120x40 image"),
    ("kitti", "zero-area box", kitti_line(KITTI_PED.format("71.00 5.00 71.00 38.00")),
     r"000000\.txt:1 \(Pedestrian\): zero-area"),
    ("kitti", "inverted box", kitti_line(KITTI_PED.format("71.00 38.00 82.00 5.00")),
     r"000000\.txt:1 \(Pedestrian\): inverted"),
    ("kitti", "unknown class", write_text("labels.txt", "Car\nTram\nRobot\n"),
     r"000000\.txt:1 \(Pedestrian\): unknown class 'Pedestrian'; known classes: \['Car', 'Tram', 'Robot'\]"),
    ("kitti", "missing image", unlink("training/image_2/000001.png"), r"000001\.txt: label file without an image"),
    ("kitti", "unreadable image", write_text("training/image_2/000001.png", b"\x89PNG\r\n\x1a\n broken"),
     r"000001\.txt: cannot read image .*000001\.png"),
    ("kitti", "duplicate file name", copy_image("training/image_2/000000.png", "training/image_2/000000.jpg"),
     r"duplicate image id \(file stem\) '000000'"),
]


class _DatasetDirs:
    """``dirs[format]`` builds only the fixture dataset a test uses."""

    def __init__(self, request) -> None:
        self.request = request

    def __getitem__(self, format: str) -> Path:
        return self.request.getfixturevalue(f"{format}_dir")


@pytest.fixture
def dataset_dir(request) -> _DatasetDirs:
    return _DatasetDirs(request)


@pytest.mark.parametrize(("format", "case", "breaks", "message"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_a_named_error(dataset_dir, format, case, breaks, message):
    root = dataset_dir[format]
    load_dataset(root, format)  # the intact fixture reads
    breaks(root)
    with pytest.raises(DatasetFormatError, match=message) as error:
        load_dataset(root, format)
    # the message starts with the full path of the file at fault, never a bare file name
    assert str(error.value).startswith(str(root) + "/"), str(error.value)


def test_every_format_covers_every_common_case():
    common = {"wrong field count", "non-number", "box outside", "zero-area box", "inverted box", "unknown class",
              "missing image", "unreadable image", "duplicate file name"}
    for format in ("coco", "voc", "yolo", "kitti"):
        covered = {case for f, case, _, _ in CASES if f == format}
        missing = common - covered - ({"wrong field count"} if format == "voc" else set())
        assert not missing, (format, missing)
    assert {"size disagrees", "duplicate image id"} <= {c for f, c, _, _ in CASES if f == "coco"}
    assert {"size disagrees", "duplicate image id"} <= {c for f, c, _, _ in CASES if f == "voc"}


# ---------------------------------------------------------------------------------------------
# repairs
# ---------------------------------------------------------------------------------------------

# (format, how to put the first box of the first image at most 1 px outside, image width)
NEAR_EDGE = [
    ("coco", set_bbox(0, [55, 0, 10, 10]), 64),
    ("voc", voc_object(xmin=56, ymin=1, xmax=65, ymax=10), 64),
    ("yolo", write_text("labels/train/p.txt", "0 0.905 0.5 0.2 0.4\n"), 100),
    ("kitti", kitti_line(KITTI_PED.format("71.00 5.00 120.50 38.00")), 120),
]
DEGENERATE = [
    ("coco", set_bbox(0, [2, 3, 0, 20])),
    ("voc", voc_object(xmin=11, xmax=10)),
    ("yolo", write_text("labels/train/p.txt", "0 0.5 0.5 0 0.4\n0 0.5 0.5 0.2 0.4\n")),
    ("kitti", kitti_line(KITTI_PED.format("71.00 5.00 71.00 38.00"))),
]


@pytest.mark.parametrize(("format", "breaks", "width"), NEAR_EDGE, ids=[c[0] for c in NEAR_EDGE])
def test_clip_within_tolerance(dataset_dir, format, breaks, width):
    root = dataset_dir[format]
    breaks(root)
    with pytest.raises(DatasetFormatError, match="px outside"):
        load_dataset(root, format)
    with pytest.raises(DatasetFormatError, match="px outside"):
        load_dataset(root, format, repair=RepairPolicy(clip_boxes_px=0.25))
    dataset = load_dataset(root, format, repair=RepairPolicy(clip_boxes_px=1))
    assert dataset[0].boxes[0, 2] == width
    assert dataset.report.counts == {"repair: box clipped to the image (<= 1 px outside)": 1}
    assert "repair: box clipped" in dataset.report.format()


@pytest.mark.parametrize(("format", "breaks"), DEGENERATE, ids=[c[0] for c in DEGENERATE])
def test_drop_degenerate_boxes(dataset_dir, format, breaks):
    root = dataset_dir[format]
    before = load_dataset(root, format)
    breaks(root)
    with pytest.raises(DatasetFormatError, match="zero-area"):
        load_dataset(root, format)
    dataset = load_dataset(root, format, repair=RepairPolicy(drop_degenerate_boxes=True))
    assert dataset.report.counts == {"drop: zero-area box": 1}
    assert dataset.num_boxes < before.num_boxes + 1
    assert all((r.boxes[:, 2:] > r.boxes[:, :2]).all() for r in dataset)


def test_report_examples_name_locations(coco_dir):
    coco_edit(lambda d: [a.__setitem__("bbox", [2, 3, 0, 1]) for a in d["annotations"]])(coco_dir)
    dataset = load_dataset(coco_dir, split="train", repair=RepairPolicy(drop_degenerate_boxes=True))
    assert dataset.report.counts == {"drop: zero-area box": 4}
    ann = coco_dir / "annotations" / "train.json"
    assert dataset.report.examples["drop: zero-area box"] == (
        f"{ann}: annotations[0] (id=100)", f"{ann}: annotations[1] (id=101)", f"{ann}: annotations[2] (id=102)")
    assert np.all([r.num_boxes == 0 for r in dataset])
    text = str(dataset.report)
    assert text.splitlines()[0].split()[0] == "4" and "annotations[0] (id=100)" in text


# ---------------------------------------------------------------------------------------------
# layouts and arguments
# ---------------------------------------------------------------------------------------------


def test_auto_detection_errors(tmp_path, coco_dir):
    from detr.errors import InvalidInputError

    with pytest.raises(DatasetFormatError, match=r"nowhere: dataset path not found"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match=r"empty: no known dataset layout found .*coco: annotations/<split>"):
        load_dataset(tmp_path / "empty")
    (coco_dir / "Annotations").mkdir()
    with pytest.raises(DatasetFormatError, match=r"fits several formats \['coco', 'voc'\]; pass the format"):
        load_dataset(coco_dir)
    assert load_dataset(coco_dir, "coco").format == "coco"  # an explicit format settles it
    with pytest.raises(InvalidInputError, match=r"unknown dataset format 'pascal'; expected one of \['auto', 'coco'"):
        load_dataset(coco_dir, "pascal")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetFormatError, match=r"cannot tell the format of a \.txt file"):
        load_dataset(tmp_path / "notes.txt")


def test_check_images_false_skips_image_checks(coco_dir, voc_dir):
    (coco_dir / "images" / "train" / "b.jpg").unlink()
    (voc_dir / "JPEGImages" / "000002.jpg").write_bytes(b"broken")
    assert len(load_dataset(coco_dir, split="train", check_images=False)) == 3
    assert len(load_dataset(voc_dir, check_images=False)) == 3


def test_non_utf8_label_file(yolo_dir):
    (yolo_dir / "labels" / "train" / "p.txt").write_bytes(b"0 0.5 0.5 0.2 0.4\xff\n")
    with pytest.raises(DatasetFormatError, match=r"p\.txt: not UTF-8 text"):
        load_dataset(yolo_dir)
