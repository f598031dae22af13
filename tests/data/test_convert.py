"""Conversion between every pair of formats, through the library and the real CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from detr.cli import main
from detr.data import load_dataset
from detr.data.convert import convert_dataset
from detr.data.formats import FORMATS, list_splits
from detr.errors import DatasetFormatError


@pytest.fixture
def sources(coco_dir, voc_dir, yolo_dir, kitti_dir):
    return {"coco": coco_dir, "voc": voc_dir, "yolo": yolo_dir, "kitti": kitti_dir}


def by_file_name(dataset):
    return {r.image_path.name: r for r in dataset}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(FORMATS, FORMATS)))
def test_every_pair_keeps_boxes_and_class_names(sources, tmp_path, src, dst):
    out = tmp_path / "converted"
    summary = convert_dataset(sources[src], out, src_format=src, dst_format=dst)
    assert summary.startswith(f"converted {sources[src]} ({src}) -> {out} ({dst})")
    splits = list_splits(sources[src], src)
    assert sorted(list_splits(out, dst)) == sorted(splits)
    for split in splits:
        before = load_dataset(sources[src], src, split=split)
        after_dataset = load_dataset(out, dst, split=split)
        after = by_file_name(after_dataset)
        assert f"split {split}: {len(before)} images, {before.num_boxes} boxes" in summary
        assert sorted(after) == sorted(r.image_path.name for r in before)
        for record in before:
            converted = after[record.image_path.name]
            np.testing.assert_array_equal(converted.boxes, record.boxes)  # exact, even across formats
            assert [after_dataset.label_map.names[i] for i in converted.labels] == [
                before.label_map.names[i] for i in record.labels
            ]
            expected_regions = record.ignore_regions if dst == "kitti" else np.zeros((0, 4))
            np.testing.assert_array_equal(converted.ignore_regions, expected_regions)


def test_summary_reports_what_the_target_cannot_hold(kitti_dir, tmp_path):
    summary = convert_dataset(kitti_dir, tmp_path / "out", dst_format="coco")
    assert "not written: attribute 'truncated' (no COCO field for it)" in summary
    assert "not written: ignore region (no COCO field for it)" in summary
    assert "not written: per-box field 'kitti_location' (no COCO field for it)" in summary


def test_voc_attributes_survive_voc_to_kitti_to_voc(voc_dir, tmp_path):
    convert_dataset(voc_dir, tmp_path / "as_kitti", dst_format="kitti", split="train")
    summary = convert_dataset(tmp_path / "as_kitti", tmp_path / "voc_again", dst_format="voc")
    # KITTI has no 'difficult': its loss is reported on the first hop
    back = load_dataset(tmp_path / "voc_again")
    original = load_dataset(voc_dir, split="train")
    for a, b in zip(original, back, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.attributes["truncated"], b.attributes["truncated"])
        np.testing.assert_array_equal(a.attributes["occluded"], b.attributes["occluded"])
    assert "split train" in summary


def test_refuses_a_non_empty_output(coco_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DatasetFormatError, match="output directory exists and is not empty"):
        convert_dataset(coco_dir, tmp_path / "out", dst_format="yolo")


def test_cli_converts(voc_dir, tmp_path, capsys):
    out = tmp_path / "as_coco"
    code = main(["data", "convert", str(voc_dir), "--from", "voc", "--to", "coco", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "split train: 2 images, 3 boxes" in printed and "split val: 1 images, 0 boxes" in printed
    converted = load_dataset(out, "coco", split="train")
    assert [r.image_path.name for r in converted] == ["000001.jpg", "000002.jpg"]


def test_cli_bad_input_is_one_line_and_exit_2(voc_dir, tmp_path, capsys):
    xml = voc_dir / "Annotations" / "000001.xml"
    xml.write_text(xml.read_text().replace("<xmin>10</xmin>", "<xmin>ten</xmin>"))
    code = main(["data", "convert", str(voc_dir), "--to", "yolo", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("detr: error: ") and "000001.xml: object[1]: <xmin> must be a number, got 'ten'" in err
