"""load_splits: mixed-format sources -> one label map -> rename/keep -> unique ids -> view."""

from __future__ import annotations

import numpy as np
import pytest

from detr.config import config_from_dict
from detr.data import load_split, load_splits
from detr.data.formats.voc import VOC_CLASSES
from detr.errors import ConfigError


def data_config(train_sources, val_sources=None, labels=None, train_view=None):
    data = {"train": {"sources": train_sources, "view": train_view or {}}}
    if val_sources is not None:
        data["val"] = {"sources": val_sources}
    if labels is not None:
        data["labels"] = labels
    return config_from_dict({"data": data}).data


def test_one_label_map_for_both_splits(voc_dir, kitti_dir, coco_dir):
    data = data_config(
        [{"path": str(voc_dir), "split": "train"}, {"path": str(kitti_dir), "format": "kitti"}],
        [{"path": str(coco_dir), "split": "val"}],
    )
    splits = load_splits(data)
    assert list(splits) == ["train", "val"]
    train, val = splits["train"], splits["val"]
    # union in source order, train first: VOC's 20 classes, then KITTI's; COCO adds nothing new
    expected = (*VOC_CLASSES, "Car", "Pedestrian", "Tram", "Robot")
    assert train.label_map.names == val.label_map.names == expected
    assert train.format == "mixed" and val.format == "coco"
    # ids collide (VOC 000001, KITTI 000001): every id gets its source index
    assert [r.image_id for r in train] == ["0/000001", "0/000002", "1/000000", "1/000001"]
    names = [[train.label_map.names[i] for i in r.labels] for r in train]
    assert names == [["dog", "person"], ["cat"], ["Pedestrian", "Car"], ["Tram", "Robot"]]
    assert [[val.label_map.names[i] for i in r.labels] for r in val] == [["cat"]]
    assert any("prefixed" in n for n in train.report.notes)


def test_rename_merges_and_keep_drops_with_counts(voc_dir, kitti_dir, coco_dir):
    data = data_config(
        [{"path": str(voc_dir), "split": "train"}, {"path": str(kitti_dir)}],
        [{"path": str(coco_dir)}],
        labels={"rename": {"Car": "car", "Pedestrian": "person", "Tram": "train"},
                "keep": ["person", "car", "dog", "cat"]},
    )
    train, val = load_splits(data).values()
    assert train.label_map.names == val.label_map.names == ("person", "car", "dog", "cat")
    names = {r.image_id: [train.label_map.names[i] for i in r.labels] for r in train}
    assert names == {"0/000001": ["dog", "person"], "0/000002": ["cat"], "1/000000": ["person", "car"],
                     "1/000001": []}
    assert train.report.counts == {"labels: dropped 'Tram' box (class not in labels.keep)": 1,
                                   "labels: dropped 'Robot' box (class not in labels.keep)": 1}
    assert train.report.examples["labels: dropped 'Robot' box (class not in labels.keep)"] [0].endswith("/training/label_2/000001.txt:2 (Robot)")
    # COCO val (all splits: 4 images): the bird boxes are dropped and counted
    assert val.report.counts == {"labels: dropped 'bird' box (class not in labels.keep)": 1}
    assert val.num_boxes == 4
    # the relabelled records keep their per-box fields in step
    kitti_first = next(r for r in train if r.image_id == "1/000000")
    np.testing.assert_allclose(kitti_first.attributes["truncated"], [0.0, 0.88], rtol=1e-6)


def test_view_applies_after_combining(voc_dir, kitti_dir):
    data = data_config(
        [{"path": str(voc_dir)}, {"path": str(kitti_dir)}],
        labels={"rename": {"Car": "car"}},
        train_view={"include_labels": ["car", "cat"], "drop_empty_images": True},
    )
    train = load_split(data, "train")
    assert [r.image_id for r in train] == ["0/000002", "1/000000"]
    assert train.report.count("view: dropped image") == 3
    with pytest.raises(ConfigError, match=r"data\.val is not set"):
        load_split(data, "val")
    with pytest.raises(ConfigError, match=r"split 'test': expected one of \['train', 'val'\]"):
        load_split(data, "test")


def test_unknown_label_edits_are_config_errors(voc_dir):
    data = data_config([{"path": str(voc_dir)}], labels={"keep": ["dog", "unicorn"]})
    with pytest.raises(ConfigError, match=r"labels\.keep: unknown classes \['unicorn'\]"):
        load_splits(data)
    data = data_config([{"path": str(voc_dir)}], train_view={"include_labels": ["Dog"]})
    with pytest.raises(ConfigError, match=r"view\.include_labels: unknown classes \['Dog'\]"):
        load_splits(data)


def test_same_source_in_both_splits_is_read_once(voc_dir, monkeypatch):
    from detr.data import sources

    calls = []
    original = sources.load_dataset
    monkeypatch.setattr(sources, "load_dataset", lambda *a, **k: calls.append(a) or original(*a, **k))
    data = data_config([{"path": str(voc_dir), "split": "train"}], [{"path": str(voc_dir), "split": "train"}])
    splits = load_splits(data)
    assert len(calls) == 1 and len(splits["train"]) == len(splits["val"]) == 2
