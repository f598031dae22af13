"""COCO reader/writer: fixture values, agreement with pycocotools, exact round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from detr.config import RepairPolicy
from detr.data import load_dataset, write_dataset
from detr.data.formats import list_splits
from detr.errors import DatasetFormatError


def test_reads_fixture(coco_dir, fixtures, matches):
    dataset = load_dataset(coco_dir)  # auto-detected, all splits
    assert dataset.format == "coco"
    assert dataset.label_map.names == ("dog", "cat", "bird")  # category order, not id order
    assert [r.image_id for r in dataset] == [10, 11, 12, 20]
    for record in dataset:
        boxes, labels, crowd = fixtures.EXPECTED_COCO[record.image_id]
        matches(record, boxes, labels)
        np.testing.assert_array_equal(record.attributes["iscrowd"], crowd)
    a = dataset[0]
    assert a.image_path == coco_dir / "images" / "train" / "a.jpg"
    assert a.extras["coco_ann_id"].tolist() == [100, 102]
    assert a.extras["coco_annotation"][0]["segmentation"] == [[2, 3, 12, 3, 12, 23]]
    ann = coco_dir / "annotations" / "train.json"
    assert a.box_sources == (f"{ann}: annotations[0] (id=100)", f"{ann}: annotations[2] (id=102)")
    assert dataset[1].extras["coco_annotation"][1]["attributes"] == {"color": "brown"}
    notes = " ".join(dataset.report.notes)
    assert "info" in notes and "supercategory" in notes


def test_splits(coco_dir):
    assert list_splits(coco_dir) == ["train", "val"]
    assert [r.image_id for r in load_dataset(coco_dir, "coco", split="val")] == [20]
    with pytest.raises(DatasetFormatError, match=r"no COCO split 'test'.*\['train', 'val'\]"):
        load_dataset(coco_dir, split="test")


def test_json_file_and_official_layout(coco_dir, tmp_path):
    direct = load_dataset(coco_dir / "annotations" / "train.json")
    assert [r.image_path for r in direct] == [coco_dir / "images" / "train" / n for n in ("a.jpg", "b.jpg", "c.jpg")]

    official = tmp_path / "official"
    (official / "annotations").mkdir(parents=True)
    val_json = (coco_dir / "annotations" / "val.json").read_text()
    (official / "annotations" / "instances_val2017.json").write_text(val_json)
    (official / "annotations" / "captions_val2017.json").write_text("{}")  # not a split
    (official / "val2017").mkdir()
    os.link(coco_dir / "images" / "val" / "d.png", official / "val2017" / "d.png")
    assert list_splits(official) == ["val2017"]
    record = load_dataset(official, split="val2017")[0]
    assert record.image_path == official / "val2017" / "d.png"


def _random_coco(rng: np.random.Generator, num_images: int, num_anns: int) -> dict:
    cat_ids = [90, 2, 17, 5]
    images = [{"id": int(i * 7 + 3), "file_name": f"{i:04d}.jpg", "width": int(rng.integers(50, 400)),
               "height": int(rng.integers(50, 400))} for i in range(num_images)]
    anns = []
    for k in range(num_anns):
        image = images[int(rng.integers(num_images))]
        x, y = rng.uniform(0, image["width"] - 2), rng.uniform(0, image["height"] - 2)
        w, h = rng.uniform(0.5, image["width"] - x), rng.uniform(0.5, image["height"] - y)
        anns.append({"id": int(1000 + k * 3), "image_id": image["id"], "category_id": int(rng.choice(cat_ids)),
                     "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": w * h,
                     "iscrowd": int(rng.random() < 0.1)})
    anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0
            and a["bbox"][0] + a["bbox"][2] <= next(i for i in images if i["id"] == a["image_id"])["width"]
            and a["bbox"][1] + a["bbox"][3] <= next(i for i in images if i["id"] == a["image_id"])["height"]]
    rng.shuffle(anns)  # annotations of one image scattered through the file
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}"} for c in cat_ids]}


def test_agrees_with_pycocotools(tmp_path):
    """Boxes, labels and crowd flags per image equal those pycocotools indexes from the same file."""
    rng = np.random.default_rng(0)
    path = tmp_path / "random.json"
    path.write_text(json.dumps(_random_coco(rng, 40, 400)))
    ours = load_dataset(path, check_images=False)
    reference = COCO(str(path))
    cat_order = [c["id"] for c in reference.dataset["categories"]]
    assert ours.label_map.names == tuple(reference.cats[c]["name"] for c in cat_order)
    assert [r.image_id for r in ours] == [im["id"] for im in reference.dataset["images"]]
    total = 0
    for record in ours:
        anns = reference.imgToAnns[record.image_id]  # file order within the image
        expected = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns], np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(record.boxes, expected)
        assert record.labels.tolist() == [cat_order.index(a["category_id"]) for a in anns]
        assert record.attributes["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
        assert record.extras["coco_ann_id"].tolist() == [a["id"] for a in anns]
        total += record.num_boxes
    assert total == len(reference.anns) > 300


def test_round_trip(coco_dir, tmp_path, same_dataset):
    original = {split: load_dataset(coco_dir, split=split) for split in ("train", "val")}
    out = tmp_path / "out"
    for split, dataset in original.items():
        assert write_dataset(dataset, out, "coco", split=split) == out
    for split, dataset in original.items():
        again = load_dataset(out, split=split)
        same_dataset(dataset, again)
        for a, b in zip(dataset, again, strict=True):
            assert a.extras["coco_ann_id"].tolist() == b.extras["coco_ann_id"].tolist()
            # every key of every annotation comes back unchanged, except the category ids: they are
            # renumbered 1..K in label order (labels themselves are compared above)
            def without_category(annotations):
                return [{k: v for k, v in ann.items() if k != "category_id"} for ann in annotations]

            assert without_category(a.extras["coco_annotation"]) == without_category(b.extras["coco_annotation"])
    # The written file is plain COCO: pycocotools reads it, categories numbered 1..K in label order.
    reference = COCO(str(out / "annotations" / "train.json"))
    assert [c["name"] for c in reference.dataset["categories"]] == ["dog", "cat", "bird"]
    assert reference.anns[102]["bbox"] == [30.5, 10.25, 20, 12.5]


@pytest.fixture
def float_dataset(tmp_path, fixtures):
    return fixtures.make_float_dataset(tmp_path, np.random.default_rng(1), range(1, 31))


def test_round_trip_is_exact_for_float_boxes(float_dataset, tmp_path, same_dataset):
    out = write_dataset(float_dataset, tmp_path / "out", "coco", split="train", images="link")
    again = load_dataset(out)
    # iscrowd is COCO's own attribute: written as 0 for records that had none.
    assert all(not r.attributes["iscrowd"].any() for r in again)
    for a, b in zip(float_dataset, again, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.image_id == b.image_id
    written = json.loads((out / "annotations" / "train.json").read_text())
    longest = max(len(repr(v)) for ann in written["annotations"] for v in ann["bbox"])
    assert longest <= 20  # short decimals, not 17-digit expansions of float32 values
    assert (out / "images" / "train" / "img0.png").stat().st_ino == (tmp_path / "src" / "img0.png").stat().st_ino


def test_non_integer_ids_are_renumbered(tmp_path, fixtures):
    dataset = fixtures.make_float_dataset(tmp_path, np.random.default_rng(2), ["x", "y"])
    out = write_dataset(dataset, tmp_path / "out", "coco")
    again = load_dataset(out)
    assert [r.image_id for r in again] == [1, 2]
    assert [r.image_path.name for r in again] == ["x.png", "y.png"]


def test_write_refuses_an_existing_split(coco_dir, tmp_path):
    dataset = load_dataset(coco_dir, split="val")
    write_dataset(dataset, tmp_path / "out", "coco", split="val")
    with pytest.raises(DatasetFormatError, match="split 'val' was written to this directory before"):
        write_dataset(dataset, tmp_path / "out", "coco", split="val")


def test_ids_colliding_across_splits_get_prefixed(coco_dir):
    val = json.loads((coco_dir / "annotations" / "val.json").read_text())
    val["images"][0]["id"] = 10
    val["annotations"][0]["image_id"] = 10
    (coco_dir / "annotations" / "val.json").write_text(json.dumps(val))
    dataset = load_dataset(coco_dir)
    assert [r.image_id for r in dataset] == ["train/10", "train/11", "train/12", "val/10"]
    assert any("prefixed" in note for note in dataset.report.notes)


def test_repair_clips_and_drops(coco_dir):
    path = coco_dir / "annotations" / "train.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [-1.5, 3, 10, 20]  # 1.5 px left of the image
    data["annotations"][2]["bbox"] = [30, 10, 0, 12]  # zero width
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"annotations\[0\] \(id=100\).*1\.5 px outside"):
        load_dataset(coco_dir, split="train")
    dataset = load_dataset(coco_dir, split="train",
                           repair=RepairPolicy(clip_boxes_px=2, drop_degenerate_boxes=True))
    np.testing.assert_array_equal(dataset[0].boxes, [[0, 3, 8.5, 23]])
    assert dataset.report.count("repair:") == 1 and dataset.report.count("drop:") == 1
    assert "annotations[2] (id=102)" in dataset.report.format()
