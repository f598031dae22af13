"""The YOLO layouts people actually have (Roboflow, supervision, Darknet as Datumaro writes it,
Ultralytics lists) read with the boxes of their source, within the precision written."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import yaml

from detr.data import load_dataset
from detr.data.formats import detect_format, list_splits
from detr.data.formats.yolo import rounding_tolerance
from detr.errors import DatasetFormatError
from tests.data.exporters import (
    datumaro_export,
    decimals_export,
    roboflow_export,
    supervision_export,
    synth_splits,
)


def assert_same_boxes(dataset, source, atol):
    """``dataset`` holds the images of ``source`` (matched by file name) with the same boxes and labels."""
    by_name = {r.image_path.name: r for r in dataset.records}
    assert sorted(by_name) == sorted(r.image_path.name for r in source.records)
    assert dataset.label_map.names == source.label_map.names
    for expected in source.records:
        got = by_name[expected.image_path.name]
        assert (got.width, got.height) == (expected.width, expected.height)
        np.testing.assert_array_equal(got.labels, expected.labels)
        np.testing.assert_allclose(got.boxes, expected.boxes, rtol=0, atol=atol)


ROUNDING_REPAIR = "repair: box corner outside the image by less than the rounding"


def corners_outside_in_text(dataset) -> int:
    """Boxes whose label line, in exact decimal arithmetic, puts a corner outside the image."""
    outside = 0
    for record in dataset:
        for line in Path(record.source).read_text().splitlines():
            cx, cy, w, h = (Decimal(t) for t in line.split()[1:])
            outside += any(v < 0 or v > 1 for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return outside


def precision_atol(decimals: int, size: int) -> float:
    """Largest corner error of boxes written with ``decimals`` decimals on a ``size`` px image."""
    return 0.75 * 10.0**-decimals * size + 1e-4


@pytest.fixture
def splits(tmp_path):
    return synth_splits(tmp_path)


def test_roboflow_export_entries_one_level_up_are_retried_without_it(splits, tmp_path):
    root = roboflow_export(splits, tmp_path / "rf")
    assert detect_format(root) == "yolo"
    assert list_splits(root) == ["train", "val"]  # `test: ../test/images` exists nowhere
    for split in ("train", "val"):
        assert_same_boxes(load_dataset(root, split=split), splits[split], atol=1e-4)
    everything = load_dataset(root / "data.yaml")
    assert len(everything) == 8
    skipped = [n for n in everything.report.notes if "'test' skipped" in n]
    assert skipped and str(tmp_path / "test" / "images") in skipped[0] and str(root / "test" / "images") in skipped[0]
    with pytest.raises(DatasetFormatError) as error:
        load_dataset(root, split="test")
    message = str(error.value)
    assert message.startswith(str(root / "data.yaml"))
    assert str(tmp_path / "test" / "images") in message and str(root / "test" / "images") in message


def test_roboflow_export_reads_as_datumaros_roboflow_importer_reads_it(splits, tmp_path):
    """An independent reader of the same files (Datumaro's roboflow_yolo) finds the same boxes."""
    pytest.importorskip("datumaro")
    root = roboflow_export(splits, tmp_path / "rf")
    ours = {r.image_path.name: r for r in load_dataset(root)}
    theirs = load_dataset(root, "datumaro:roboflow_yolo")
    assert sorted(list_splits(root, "datumaro:roboflow_yolo")) == ["train", "valid"]
    assert len(theirs) == len(ours) == 8
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    for record in theirs:
        mine = ours[record.image_path.name]
        np.testing.assert_allclose(record.boxes, mine.boxes, rtol=0, atol=1e-4)
        assert [theirs.label_map.names[i] for i in record.labels] == [names[i] for i in mine.labels]


def test_roboflow_entry_that_exists_one_level_up_is_used_as_written(splits, tmp_path):
    """Ultralytics resolves ``../x`` against the yaml's folder first; the retry is only a fallback."""
    root = roboflow_export({"train": splits["train"]}, tmp_path / "outer" / "rf")
    moved = tmp_path / "outer" / "train"
    (root / "train").rename(moved)
    dataset = load_dataset(root, split="train")
    assert {r.image_path.parent for r in dataset} == {moved / "images"}
    assert_same_boxes(dataset, splits["train"], atol=1e-4)


def test_supervision_export_without_split_entries(splits, tmp_path):
    pytest.importorskip("supervision")
    root = supervision_export(splits, tmp_path / "sv")
    assert set(yaml.safe_load((root / "data.yaml").read_text())) == {"nc", "names"}
    first = next((root / "labels" / "train").glob("*.txt")).read_text().split()
    assert all(len(token.partition(".")[2]) == 5 for token in first[1:5])  # supervision writes 5 decimals
    assert list_splits(root) == ["train", "val"]
    repaired = 0
    for split in ("train", "val"):
        dataset = load_dataset(root, split=split)
        assert_same_boxes(dataset, splits[split], atol=precision_atol(5, 320))
        repaired += dataset.report.count(ROUNDING_REPAIR)
        assert dataset.report.count(ROUNDING_REPAIR) == corners_outside_in_text(dataset)
        for record in dataset:  # boxes that touch the border stay on it
            assert (record.boxes[:, [0, 2]] <= record.width).all() and (record.boxes[:, [1, 3]] <= record.height).all()
    assert repaired > 0  # this set has a border box that 5 decimals put outside: the case


def test_darknet_layout_written_by_datumaro(splits, tmp_path):
    pytest.importorskip("datumaro")
    root = datumaro_export(splits, tmp_path / "darknet", "yolo")
    assert (root / "obj.data").is_file() and (root / "obj_train_data").is_dir()
    assert "train = data/train.txt" in (root / "obj.data").read_text()
    assert detect_format(root) == "yolo" and detect_format(root / "obj.data") == "yolo"
    assert sorted(list_splits(root)) == ["train", "val"]  # in the order of obj.data's lines
    for split in ("train", "val"):
        dataset = load_dataset(root, split=split)
        assert_same_boxes(dataset, splits[split], atol=precision_atol(6, 320))
        assert all(r.source == str(r.image_path.with_suffix(".txt")) for r in dataset)
    # Datumaro writes %.6f: a box touching the border may come back a few 1e-5 px outside, within
    # the rounding of 6 decimals: put on the border and counted, as many as the text (in exact
    # decimal arithmetic) puts outside.
    dataset = load_dataset(root)
    assert dataset.report.count(ROUNDING_REPAIR) == corners_outside_in_text(dataset)
    for record in dataset:
        assert (record.boxes >= 0).all() and (record.boxes[:, [0, 2]] <= record.width).all()
        assert (record.boxes[:, [1, 3]] <= record.height).all()


def test_darknet_missing_image_names_the_paths_tried(splits, tmp_path):
    pytest.importorskip("datumaro")
    root = datumaro_export(splits, tmp_path / "darknet", "yolo")
    first = (root / "train.txt").read_text().splitlines()[0]  # data/obj_train_data/<name>.png
    (root / first.removeprefix("data/")).unlink()
    with pytest.raises(DatasetFormatError) as error:
        load_dataset(root, split="train")
    message = str(error.value)
    assert message.startswith(f"{root / 'train.txt'}:1: image {first!r} not found (looked for ")
    assert str(root / first) in message and str(root / first.removeprefix("data/")) in message
    (root / "obj.names").unlink()
    with pytest.raises(DatasetFormatError, match=r"obj\.data:\d+: class names file not found \(looked for .*obj\.names"):
        load_dataset(root)


def test_ultralytics_lists_written_by_datumaro(splits, tmp_path):
    pytest.importorskip("datumaro")
    root = datumaro_export(splits, tmp_path / "ul", "yolo_ultralytics")
    assert yaml.safe_load((root / "data.yaml").read_text())["train"] == "train.txt"
    for split in ("train", "val"):
        assert_same_boxes(load_dataset(root, split=split), splits[split], atol=precision_atol(6, 320))


@pytest.mark.parametrize("decimals", [3, 4, 5, 6])
def test_few_decimals_are_read_within_their_precision(splits, tmp_path, decimals):
    root = decimals_export(splits, tmp_path / f"d{decimals}", decimals=decimals)
    dataset = load_dataset(root)
    assert_same_boxes(dataset, _merged(splits), atol=precision_atol(decimals, 320))


def _merged(splits):
    from detr.data.dataset import concatenate

    return concatenate(list(splits.values()), list(splits), name="all")


def test_rounding_tolerance_follows_the_decimals_written(fixtures, tmp_path):
    """The issue's case: 5 decimals, a corner 0.0016 px outside a 320x320 image is rounding
    (tolerance 0.75e-5 x 320 = 0.0024 px); 0.003 px is not; 6 decimals tolerate 10x less."""
    assert rounding_tolerance(np.array([5]))[0] == pytest.approx(0.75e-5)
    assert rounding_tolerance(np.array([0]))[0] == 1e-6  # integers show no precision: the default
    lines = {"a.png": (320, 320, ["0 0.93594 0.5 0.12813 0.5"])}  # x2 = 1.000005 -> 0.0016 px outside
    root = fixtures.write_yolo(tmp_path / "five", {"train": lines}, names={0: "thing"})
    dataset = load_dataset(root)
    assert dataset[0].boxes[0, 2] == 320
    reason = "repair: box corner outside the image by less than the rounding of its decimals put on the border"
    assert dataset.report.counts == {reason: 1}
    assert dataset.report.examples[reason][0].startswith(f"{root / 'labels' / 'train' / 'a.txt'}:1")
    for text in ("0 0.93595 0.5 0.12812 0.5", "0 0.935940 0.5 0.128130 0.5"):  # 0.0032 px / 6 decimals
        (root / "labels" / "train" / "a.txt").write_text(text + "\n")
        with pytest.raises(DatasetFormatError, match=r"a\.txt:1 .* px outside the 320x320 image"):
            load_dataset(root)
    (root / "labels" / "train" / "a.txt").write_text("0 9.3594e-01 0.5 1.2813e-01 0.5\n")  # 5 decimals too
    assert load_dataset(root).report.count("repair: box corner") == 1


def test_label_folder_and_class_errors_name_full_paths(splits, tmp_path):
    root = decimals_export(splits, tmp_path / "sv", decimals=6)
    orphan = root / "labels" / "train" / "nothing.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetFormatError) as error:
        load_dataset(root, split="train")
    assert str(error.value).startswith(f"{orphan}: label file without an image in the split (looked for "
                                       f"{root / 'images' / 'train' / 'nothing'}.{{")
    orphan.unlink()
    (root / "data.yaml").unlink()
    with pytest.raises(DatasetFormatError) as error:
        load_dataset(root, "yolo")
    assert str(root / "classes.txt") in str(error.value) and str(root / "data.yaml") in str(error.value)
