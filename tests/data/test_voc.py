"""VOC reader/writer: 1-based coordinates, attributes, split lists, class order, round trips."""

from __future__ import annotations

import numpy as np
import pytest

from detr.data import load_dataset, write_dataset
from detr.data.formats import list_splits
from detr.data.formats.voc import VOC_CLASSES
from detr.errors import DatasetFormatError


def test_reads_fixture(voc_dir, fixtures, matches):
    dataset = load_dataset(voc_dir)  # auto-detected; all splits united (trainval repeats them)
    assert dataset.format == "voc"
    assert dataset.label_map.names == VOC_CLASSES  # all VOC names: the full list, in VOC order
    assert [r.image_id for r in dataset] == ["000001", "000002", "000003"]
    for record in dataset:
        boxes, labels, difficult, truncated, occluded = fixtures.EXPECTED_VOC[record.image_id]
        matches(record, boxes, [VOC_CLASSES.index(fixtures.VOC_NAMES[k]) for k in labels])
        assert record.attributes["difficult"].tolist() == difficult
        assert record.attributes["truncated"].tolist() == truncated
        assert record.attributes["occluded"].tolist() == occluded
        assert record.image_path == voc_dir / "JPEGImages" / f"{record.image_id}.jpg"
    xml = voc_dir / "Annotations" / "000001.xml"
    assert dataset[0].box_sources == (f"{xml}: object[0] (dog)", f"{xml}: object[1] (person)")
    assert dataset[0].extras["voc_pose"].tolist() == ["Left", "Left"]


def test_splits(voc_dir):
    # dog_train.txt is a per-class list, not a split.
    assert list_splits(voc_dir) == ["train", "trainval", "val"]
    assert [r.image_id for r in load_dataset(voc_dir, "voc", split="val")] == ["000003"]
    with pytest.raises(DatasetFormatError, match=r"no VOC split 'test'.*\['train', 'trainval', 'val'\]"):
        load_dataset(voc_dir, split="test")


def test_without_split_lists_reads_every_xml(voc_dir):
    for path in (voc_dir / "ImageSets" / "Main").iterdir():
        path.unlink()
    assert len(load_dataset(voc_dir)) == 3


def test_class_order_rules(voc_dir, tmp_path, fixtures):
    # Names outside the VOC classes: sorted.
    other = fixtures.write_voc(tmp_path / "other", {"a": (20, 20, [("zebra", 1, 1, 5, 5, 0, 0, 0)]),
                                                    "b": (20, 20, [("car", 1, 1, 5, 5, 0, 0, 0)])},
                               {"train": ["a", "b"]})
    assert load_dataset(other).label_map.names == ("car", "zebra")
    # labels.txt wins.
    (voc_dir / "labels.txt").write_text("person\ndog\ncat\nhorse\n")
    dataset = load_dataset(voc_dir, split="train")
    assert dataset.label_map.names == ("person", "dog", "cat", "horse")
    assert dataset[0].labels.tolist() == [1, 0]


def test_round_trip(voc_dir, tmp_path, same_dataset):
    out = tmp_path / "out"
    original = {split: load_dataset(voc_dir, split=split) for split in ("train", "val")}
    for split, dataset in original.items():
        write_dataset(dataset, out, "voc", split=split)
    assert (out / "labels.txt").read_text().split() == list(VOC_CLASSES)
    for split, dataset in original.items():
        again = load_dataset(out, split=split)
        same_dataset(dataset, again)
        for a, b in zip(dataset, again, strict=True):
            assert sorted(a.extras) == sorted(b.extras)
            if "voc_pose" in a.extras:
                assert a.extras["voc_pose"].tolist() == b.extras["voc_pose"].tolist()
    # The 1-based convention is written back: the whole-image box is 1..64.
    text = (out / "Annotations" / "000001.xml").read_text()
    assert "<xmin>1</xmin>" in text and "<xmax>64</xmax>" in text


def test_round_trip_float_boxes(tmp_path, fixtures):
    dataset = fixtures.make_float_dataset(tmp_path, np.random.default_rng(3), [f"im{k}" for k in range(20)])
    out = write_dataset(dataset, tmp_path / "out", "voc")
    again = load_dataset(out)
    for a, b in zip(dataset, again, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.image_id == b.image_id
    assert again.label_map.names == dataset.label_map.names


def test_trainval_shares_files_with_train(voc_dir, tmp_path):
    """VOC lists overlap; writing the same image for two splits is allowed, other content is not."""
    out = tmp_path / "out"
    for split in ("train", "trainval"):
        write_dataset(load_dataset(voc_dir, split=split), out, "voc", split=split)
    assert len(load_dataset(out, split="trainval")) == 3
    changed = load_dataset(voc_dir, split="val")
    from dataclasses import replace

    clash = replace(changed, records=tuple(replace(r, image_id="000001") for r in changed.records))
    with pytest.raises(DatasetFormatError, match="000001.xml already exists with other content"):
        write_dataset(clash, out, "voc", split="other")


def test_zero_based_file_needs_one_px_clip(voc_dir, fixtures):
    from detr.config import RepairPolicy

    (voc_dir / "Annotations" / "000002.xml").write_text(
        fixtures.voc_xml("000002", 50, 40, [("cat", 0, 0, 25, 30, 0, 0, 0)]))
    with pytest.raises(DatasetFormatError, match=r"000002.xml: object\[0\] \(cat\).*1 px outside"):
        load_dataset(voc_dir, split="train")
    dataset = load_dataset(voc_dir, split="train", repair=RepairPolicy(clip_boxes_px=1))
    np.testing.assert_array_equal(dataset[1].boxes, [[0, 0, 25, 30]])
    assert dataset.report.count("repair: box clipped") == 1
