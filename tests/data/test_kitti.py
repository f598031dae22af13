"""KITTI reader/writer: 15/16-field lines, DontCare regions, class order, exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from detr.data import load_dataset, write_dataset
from detr.data.formats import list_splits
from detr.errors import DatasetFormatError


def test_reads_fixture(kitti_dir, fixtures, matches):
    dataset = load_dataset(kitti_dir)
    assert dataset.format == "kitti"
    # canonical KITTI order filtered to present, then the others sorted
    assert dataset.label_map.names == ("Car", "Pedestrian", "Tram", "Robot")
    assert [r.image_id for r in dataset] == ["000000", "000001"]
    for record in dataset:
        boxes, labels, truncated, occluded, ignore = fixtures.EXPECTED_KITTI[record.image_id]
        matches(record, boxes, labels)
        np.testing.assert_allclose(record.attributes["truncated"], truncated)
        assert record.attributes["occluded"].tolist() == occluded
        np.testing.assert_array_equal(record.ignore_regions, np.asarray(ignore, np.float32).reshape(-1, 4))
    first = dataset[0]
    np.testing.assert_allclose(first.extras["kitti_dimensions"][0], [1.89, 0.48, 1.20], rtol=1e-6)
    np.testing.assert_allclose(first.extras["kitti_location"][1], [-3.0, 1.7, 5.0], rtol=1e-6)
    np.testing.assert_allclose(first.extras["kitti_rotation_y"], [0.01, -1.57], rtol=1e-6)
    assert np.isnan(first.extras["kitti_score"][0]) and first.extras["kitti_score"][1] == np.float32(0.95)
    label = kitti_dir / "training" / "label_2" / "000000.txt"
    assert first.box_sources == (f"{label}:1 (Pedestrian)", f"{label}:2 (Car)")


def test_splits(kitti_dir, fixtures):
    (kitti_dir / "testing" / "image_2").mkdir(parents=True)  # no label_2: not a split
    assert list_splits(kitti_dir) == ["training"]
    fixtures.write_kitti(kitti_dir, {"000009": fixtures.KITTI_LABELS["000001"]}, split="val")
    assert list_splits(kitti_dir) == ["training", "val"]
    assert [r.image_id for r in load_dataset(kitti_dir, split="val")] == ["000009"]
    # a split directory itself is a dataset of one split
    assert len(load_dataset(kitti_dir / "training")) == 2
    with pytest.raises(DatasetFormatError, match=r"no KITTI split 'train'.*\['training', 'val'\]"):
        load_dataset(kitti_dir, split="train")


def test_round_trip(kitti_dir, tmp_path, same_dataset):
    original = load_dataset(kitti_dir, split="training")
    out = write_dataset(original, tmp_path / "out", "kitti", split="training")
    assert (out / "labels.txt").read_text() == "Car\nPedestrian\nTram\nRobot\n"
    again = load_dataset(out)
    same_dataset(original, again)
    for a, b in zip(original, again, strict=True):
        assert sorted(a.extras) == sorted(b.extras)
        for key in a.extras:
            np.testing.assert_array_equal(a.extras[key], b.extras[key])
    lines = (out / "training" / "label_2" / "000000.txt").read_text().splitlines()
    assert lines[1] == "Car 0.88 3 -1.55 0 10.25 30 39 1.5 1.6 3.7 -3 1.7 5 -1.57 0.95"
    assert lines[2] == "DontCare -1 -1 -10 100 2 119 20 -1 -1 -1 -1000 -1000 -1000 -10"


def test_round_trip_float_boxes(tmp_path, fixtures):
    dataset = fixtures.make_float_dataset(tmp_path, np.random.default_rng(5), [f"im{k}" for k in range(20)])
    out = write_dataset(dataset, tmp_path / "out", "kitti", split="train")
    again = load_dataset(out)
    # the directory holds no order: images come back sorted by file name
    assert [r.image_id for r in again] == sorted(r.image_id for r in dataset)
    again_by_id = {r.image_id: r for r in again}
    for a in dataset:
        b = again_by_id[a.image_id]
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
        # no occlusion information in the source: written as KITTI's "unknown" (3)
        assert (b.attributes["occluded"] == 3).all()


def test_class_names_with_spaces_become_underscores(tmp_path, fixtures):
    from dataclasses import replace

    from detr.data import LabelMap
    from detr.data.formats import write_split

    dataset = fixtures.make_float_dataset(tmp_path, np.random.default_rng(6), ["a", "b"])
    dataset = replace(dataset, label_map=LabelMap(("traffic light", "car", "stop  sign")))
    out, report = write_split(dataset, tmp_path / "out", "kitti")
    assert load_dataset(out).label_map.names == ("traffic_light", "car", "stop_sign")
    assert any("'traffic light' written as KITTI type 'traffic_light'" in n for n in report.notes)


def test_two_d_only_labels_carry_no_3d_extras(kitti_dir, tmp_path):
    """Placeholders (-10, -1, -1000) are not information: no extras, and nothing 'lost' in COCO."""
    label = kitti_dir / "training" / "label_2" / "000001.txt"
    label.write_text("Tram 0.10 1 -10 1.00 2.00 79.00 59.00 -1 -1 -1 -1000 -1000 -1000 -10\n")
    record = load_dataset(kitti_dir)[1]
    assert record.extras == {}
    out = write_dataset(load_dataset(kitti_dir), tmp_path / "out", "kitti", split="training")
    assert (out / "training" / "label_2" / "000001.txt").read_text() == (
        "Tram 0.1 1 -10 1 2 79 59 -1 -1 -1 -1000 -1000 -1000 -10\n"
    )
