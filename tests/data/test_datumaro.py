"""``datumaro:<fmt>``: CVAT, LabelMe, Open Images and WIDER Face written by Datumaro from the synthetic
set read back with the same boxes, into the same label map, views, report and error messages as the
built-in formats."""

from __future__ import annotations

import re

import numpy as np
import pytest

from detr.config import RepairPolicy, SourceSpec, ViewSpec
from detr.data import list_splits, load_dataset, write_dataset
from detr.errors import DatasetFormatError, InvalidInputError
from tests.data.exporters import datumaro_export, synth_splits

pytest.importorskip("datumaro")

# The synthetic boxes are whole pixels, which every one of these formats writes exactly (CVAT with 2
# decimals, Open Images normalized), so the boxes read back are equal, not just close.
FORMATS = ["cvat", "label_me", "open_images", "wider_face"]


@pytest.fixture
def splits(tmp_path):
    return synth_splits(tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_what_datumaro_wrote_with_equal_boxes(splits, tmp_path, fmt):
    root = datumaro_export(splits, tmp_path / fmt, fmt)
    assert sorted(list_splits(root, f"datumaro:{fmt}")) == ["train", "val"]
    for split in ("train", "val"):
        dataset = load_dataset(root, f"datumaro:{fmt}", split=split)
        source = splits[split]
        assert dataset.format == f"datumaro:{fmt}"
        if fmt == "cvat":  # CVAT lists the labels; LabelMe's order is the order of appearance
            assert dataset.label_map.names == source.label_map.names
        by_stem = {r.image_path.stem: r for r in dataset}
        assert sorted(by_stem) == sorted(r.image_path.stem for r in source)
        for expected in source:
            got = by_stem[expected.image_path.stem]
            assert got.image_path.is_file() and (got.width, got.height) == (expected.width, expected.height)
            np.testing.assert_array_equal(got.boxes, expected.boxes)
            assert [dataset.label_map.names[i] for i in got.labels] == [
                source.label_map.names[i] for i in expected.labels]
            np.testing.assert_array_equal(got.attributes["occluded"], expected.attributes["occluded"] > 0)
            assert all(s.startswith(f"{root} [datumaro:{fmt}] item ") for s in got.box_sources)
    everything = load_dataset(root, f"datumaro:{fmt}")
    assert len(everything) == len(splits["train"]) + len(splits["val"])


def test_views_labels_and_stats_work_on_datumaro_sources(splits, tmp_path):
    from detr.config import DataConfig
    from detr.data import load_splits
    from detr.data.stats import compute_stats

    root = datumaro_export(splits, tmp_path / "cvat", "cvat")
    view = ViewSpec(include_labels=["circle", "square"], min_box_size=30)
    dataset = load_dataset(root, "datumaro:cvat", split="train", view=view)
    source = splits["train"]
    expected = sum(
        int(((np.isin(r.labels, [0, 1])) & ((r.boxes[:, 2:] - r.boxes[:, :2]).min(axis=1) >= 30)).sum()) for r in source
    )
    assert dataset.num_boxes == expected
    assert dataset.report.count("view:") == source.num_boxes - expected
    data = DataConfig.model_validate({
        "train": {"sources": [{"path": str(root), "format": "datumaro:cvat", "split": "train"}]},
        "val": {"sources": [{"path": str(root), "format": "datumaro:cvat", "split": "val"}]},
        "labels": {"rename": {"star": "circle"}},
    })
    loaded = load_splits(data)
    assert "star" not in loaded["train"].label_map and len(loaded["train"].label_map) == 5
    assert compute_stats(loaded["val"]).num_boxes == splits["val"].num_boxes


def test_what_is_not_a_box_is_counted_not_dropped(splits, tmp_path):
    root = datumaro_export(splits, tmp_path / "cvat", "cvat", extra_polygon=True)
    dataset = load_dataset(root, "datumaro:cvat", split="train")
    assert dataset.report.counts == {"not carried: Datumaro polygon annotation (only boxes are read)": 1}
    assert dataset.num_boxes == splits["train"].num_boxes


def test_bad_boxes_are_named_errors_and_repairs_follow_the_policy(splits, tmp_path):
    root = datumaro_export(splits, tmp_path / "cvat", "cvat")
    xml = root / "train.xml"
    text = xml.read_text()
    first_box = re.search(r'xbr="([\d.]+)"', text)
    xml.write_text(text[: first_box.start(1)] + "320.75" + text[first_box.end(1):])  # 0.75 px outside
    with pytest.raises(DatasetFormatError) as error:
        load_dataset(root, "datumaro:cvat", split="train")
    message = str(error.value)
    assert message.startswith(f"{root} [datumaro:cvat] item ") and "annotation[0]" in message
    assert "lies 0.75 px outside the 320x240 image" in message
    dataset = load_dataset(root, "datumaro:cvat", split="train", repair=RepairPolicy(clip_boxes_px=1))
    assert dataset.report.counts == {"repair: box clipped to the image (<= 1 px outside)": 1}


def test_missing_image_and_unknown_formats_are_named(splits, tmp_path):
    root = datumaro_export(splits, tmp_path / "lm", "label_me")
    image = next((root / "Images" / "train").glob("*.png"))
    image.unlink()
    with pytest.raises(DatasetFormatError, match=rf"item '{image.stem}' \(subset train\): image file {image} not found"):
        load_dataset(root, "datumaro:label_me", split="train")
    with pytest.raises(InvalidInputError, match=r"datumaro:cvatt: Datumaro has no importer 'cvatt'; available: .*'cvat'"):
        load_dataset(root, "datumaro:cvatt")
    with pytest.raises(DatasetFormatError, match=rf"{tmp_path / 'empty'}: Datumaro cannot read it as 'cvat'"):
        (tmp_path / "empty").mkdir()
        load_dataset(tmp_path / "empty", "datumaro:cvat")
    assert SourceSpec(path=root, format="datumaro:label_me").format == "datumaro:label_me"
    with pytest.raises(InvalidInputError, match=r"'datumaro:cvat' can be read but has no writer"):
        write_dataset(splits["val"], tmp_path / "out", "datumaro:cvat")


def test_convert_and_show_from_a_datumaro_format(splits, tmp_path, capsys):
    from detr.cli import main

    root = datumaro_export(splits, tmp_path / "cvat", "cvat")
    out = tmp_path / "as_coco"
    assert main(["data", "convert", str(root), "--from", "datumaro:cvat", "--to", "coco", "--out", str(out)]) in (0, None)
    assert "(datumaro:cvat) ->" in capsys.readouterr().out
    for split in ("train", "val"):
        converted = {r.image_path.stem: r for r in load_dataset(out, "coco", split=split)}
        for expected in splits[split]:
            np.testing.assert_array_equal(converted[expected.image_path.stem].boxes, expected.boxes)
    png = tmp_path / "shown.png"
    assert main(["data", "show", str(root), "--format", "datumaro:cvat", "--split", "val", "--out", str(png)]) in (0, None)
    assert png.read_bytes()[:4] == b"\x89PNG"
