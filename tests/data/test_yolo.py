"""YOLO reader/writer: normalized boxes, data.yaml forms, label discovery, exact round trips."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from detr.data import load_dataset, write_dataset
from detr.data.formats import list_splits
from detr.errors import DatasetFormatError


def test_reads_fixture(yolo_dir, fixtures, matches):
    dataset = load_dataset(yolo_dir)
    assert dataset.format == "yolo"
    assert dataset.label_map.names == ("square", "circle")
    assert [r.image_id for r in dataset] == ["p", "q", "r"]
    for record in dataset:
        matches(record, *fixtures.EXPECTED_YOLO[record.image_id])
        assert record.attributes == {} and record.extras == {}
    assert dataset[0].box_sources[1] == f"{yolo_dir / 'labels' / 'train' / 'p.txt'}:2"
    assert (dataset[0].width, dataset[0].height) == (100, 50)  # from the image header
    assert any("1 images have no label file" in note for note in dataset.report.notes)


def test_splits_and_names_forms(yolo_dir):
    assert list_splits(yolo_dir) == ["train", "val"]
    config = yaml.safe_load((yolo_dir / "data.yaml").read_text())
    config["names"] = ["square", "circle"]  # list form
    config["test"] = "images/test"  # a split without labels: not a dataset split
    (yolo_dir / "images" / "test").mkdir()
    (yolo_dir / "data.yaml").write_text(yaml.safe_dump(config))
    assert list_splits(yolo_dir) == ["train", "val"]
    dataset = load_dataset(yolo_dir / "data.yaml", split="val")  # the yaml file itself also works
    assert dataset.label_map.names == ("square", "circle") and len(dataset) == 1
    everything = load_dataset(yolo_dir)
    assert len(everything) == 3 and any("'test' skipped" in n for n in everything.report.notes)
    with pytest.raises(DatasetFormatError, match=f"split 'test' has no label folder {yolo_dir / 'labels' / 'test'}"):
        load_dataset(yolo_dir, split="test")


def test_classes_txt_without_data_yaml(yolo_dir):
    (yolo_dir / "data.yaml").unlink()
    (yolo_dir / "classes.txt").write_text("square\ncircle\n")
    dataset = load_dataset(yolo_dir, "yolo")
    assert dataset.label_map.names == ("square", "circle")
    assert [r.image_id for r in dataset] == ["p", "q", "r"]


def test_roboflow_layout(tmp_path, fixtures):
    """train/images + train/labels, entries relative to the yaml: the last 'images' becomes 'labels'."""
    root = tmp_path / "rf"
    fixtures.make_image(root / "train" / "images" / "a.jpg", 10, 10)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("train: train/images\nnc: 1\nnames: ['thing']\n")
    dataset = load_dataset(root / "data.yaml")
    np.testing.assert_array_equal(dataset[0].boxes, [[2.5, 2.5, 7.5, 7.5]])


def test_round_trip(yolo_dir, tmp_path, same_dataset):
    out = tmp_path / "out"
    original = {split: load_dataset(yolo_dir, split=split) for split in ("train", "val")}
    for split, dataset in original.items():
        write_dataset(dataset, out, "yolo", split=split)
    config = yaml.safe_load((out / "data.yaml").read_text())
    assert config == {"train": "images/train", "val": "images/val", "names": {0: "square", 1: "circle"}}
    assert (out / "labels" / "train" / "p.txt").read_text() == "0 0.5 0.5 0.2 0.4\n1 0.25 0.3 0.5 0.6\n"
    assert (out / "labels" / "train" / "q.txt").read_text() == ""
    for split, dataset in original.items():
        same_dataset(dataset, load_dataset(out, split=split))


def test_round_trip_float_boxes(tmp_path, fixtures):
    dataset = fixtures.make_float_dataset(tmp_path, np.random.default_rng(4), [f"im{k}" for k in range(30)])
    out = write_dataset(dataset, tmp_path / "out", "yolo")
    again = load_dataset(out)
    # the directory holds no order: images come back sorted by file name
    assert [r.image_id for r in again] == sorted(r.image_id for r in dataset)
    again_by_id = {r.image_id: r for r in again}
    for a in dataset:
        b = again_by_id[a.image_id]
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
    lengths = [len(token) for path in (out / "labels" / "train").glob("*.txt")
               for line in path.read_text().splitlines() for token in line.split()]
    assert max(lengths) <= 20


def test_later_split_may_use_a_subset_of_the_classes(yolo_dir, tmp_path):
    out = tmp_path / "out"
    write_dataset(load_dataset(yolo_dir, split="train"), out, "yolo", split="train")
    val = load_dataset(yolo_dir, split="val")
    from dataclasses import replace

    from detr.data import LabelMap

    # val in a map with only 'circle': its ids are rewritten into data.yaml's ids.
    only_circle = replace(val, label_map=LabelMap(("circle",)),
                          records=tuple(r.relabel(np.array([-1, 0])) for r in val.records))
    write_dataset(only_circle, out, "yolo", split="val")
    assert load_dataset(out, split="val")[0].labels.tolist() == [1]
    new_class = replace(val, label_map=LabelMap(("square", "circle", "star")))
    with pytest.raises(DatasetFormatError, match=r"also has \['star'\]"):
        write_dataset(new_class, out, "yolo", split="test")


def test_decimal_rounding_at_the_border_is_clamped_and_counted(tmp_path, fixtures):
    """A box touching the right border, written with Ultralytics' 6 decimals, reads back 3.2e-4 px
    outside the image: rounding, put on the border and counted, not an error."""
    root = fixtures.write_yolo(tmp_path / "rounded", {"train": {"w.jpg": (640, 64, ["0 0.960938 0.5 0.078125 0.5"])}})
    dataset = load_dataset(root)
    np.testing.assert_allclose(dataset[0].boxes, [[590.0, 16, 640, 48]], atol=1e-3)
    assert dataset[0].boxes[0, 2] == 640
    assert dataset.report.count("repair: box corner") == 1
