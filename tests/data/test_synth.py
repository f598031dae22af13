"""The generated shapes dataset: determinism, what the scenes contain, exact boxes, every format
written and read back, and the CLI commands built on it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes

from detr.cli import main
from detr.data import load_dataset
from detr.data.synth import CLASSES, generate_synthetic_dataset, image_rng, split_sizes, synthetic_dataset
from detr.data.synth_scene import NOISE_AMPLITUDE, OCCLUSION_LEVELS, render_scene
from detr.errors import InvalidInputError

FORMAT_ATTRIBUTES = {
    "coco": {"iscrowd"},
    "voc": {"difficult", "occluded", "truncated"},
    "yolo": set(),
    "kitti": {"occluded", "truncated"},
}


def read_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def fifty(tmp_path_factory) -> object:
    """50 images at 320x320, in memory (PNG files in a temp dir)."""
    return synthetic_dataset(tmp_path_factory.mktemp("synth50"), 50, seed=7, progress=False)


def test_same_seed_gives_identical_files(tmp_path):
    a = generate_synthetic_dataset(
        tmp_path / "a", format="coco", num_images=6, seed=11, image_size=(96, 80), progress=False
    )
    b = generate_synthetic_dataset(
        tmp_path / "b", format="coco", num_images=6, seed=11, image_size=(96, 80), progress=False
    )
    c = generate_synthetic_dataset(
        tmp_path / "c", format="coco", num_images=6, seed=12, image_size=(96, 80), progress=False
    )
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert Path("annotations/train.json") in files_a and Path("annotations/val.json") in files_a
    assert not (a / ".synth-images").exists()  # the staging directory is gone
    for name in ("annotations/train.json", "annotations/val.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    images = [p for p in files_a if p.suffix == ".png"]
    assert len(images) == 6
    for rel in images:
        np.testing.assert_array_equal(read_pixels(a / rel), read_pixels(b / rel))
    assert any(not np.array_equal(read_pixels(a / rel), read_pixels(c / rel)) for rel in images)


def test_image_i_depends_only_on_seed_and_index(tmp_path):
    small = synthetic_dataset(tmp_path / "s", 3, seed=5, image_size=(64, 64), progress=False)
    large = synthetic_dataset(tmp_path / "l", 5, seed=5, image_size=(64, 64), progress=False)
    for a, b in zip(small.records, large.records):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(read_pixels(a.image_path), read_pixels(b.image_path))


def test_scenes_are_varied_and_annotated(fifty):
    records = fifty.records
    assert fifty.label_map.names == CLASSES and len(CLASSES) >= 5
    counts = np.array([r.num_boxes for r in records])
    assert counts.min() >= 1 and counts.max() <= 6 and len(set(counts.tolist())) >= 4
    labels = np.concatenate([r.labels for r in records])
    assert set(labels.tolist()) == set(range(len(CLASSES)))  # every class occurs
    boxes = np.concatenate([r.boxes for r in records])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 320).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    sizes = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    assert sizes.min() < 32 and sizes.max() > 96  # COCO small and large objects both occur
    attributes = {
        name: np.concatenate([r.attributes[name] for r in records]) for name in records[0].attributes
    }
    assert (attributes["occluded"] >= 1).sum() >= 5
    assert set(np.unique(attributes["occluded"]).tolist()) <= {0, 1, 2}
    assert (attributes["truncated"] > 0).sum() >= 5
    assert (attributes["truncated"] <= 1).all()
    assert attributes["difficult"].sum() >= 1
    assert not attributes["iscrowd"].any()
    # truncated boxes touch the image border (they are clipped to it)
    cut = attributes["truncated"] >= 0.05
    touches = (boxes[:, 0] == 0) | (boxes[:, 1] == 0) | (boxes[:, 2] == 320) | (boxes[:, 3] == 320)
    assert touches[cut].all()


def test_boxes_are_tight_around_drawn_pixels_and_attributes_follow_masks():
    for index in range(12):
        scene = render_scene(image_rng(3, index), 160, 120)
        masks = torch.from_numpy(scene.masks)
        # torchvision's masks_to_boxes gives inclusive pixel indices; records use pixel edges
        expected = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        np.testing.assert_array_equal(scene.boxes, expected.numpy())
        for i in range(len(scene.labels)):
            hidden = 1 - scene.visible[i].sum() / scene.masks[i].sum()
            assert scene.attributes["occluded"][i] == np.searchsorted(OCCLUSION_LEVELS, hidden, side="right")
            # every visible pixel shows the shape's fill or rim colour, up to the sensor grain
            pixels = scene.image[scene.visible[i]].astype(int)  # [P, 3]
            distance = np.abs(pixels[:, None, :] - scene.colours[i].astype(int)[None]).max(axis=2)  # [P, 2]
            assert (distance.min(axis=1) <= NOISE_AMPLITUDE).all()
            later = (
                scene.masks[i + 1 :].any(axis=0)
                if i + 1 < len(scene.labels)
                else np.zeros_like(scene.masks[i])
            )
            np.testing.assert_array_equal(scene.visible[i], scene.masks[i] & ~later)


def test_all_formats_written_and_read_back(tmp_path):
    reference = synthetic_dataset(tmp_path / "ref", 7, seed=2, image_size=(128, 96), progress=False)
    by_name = {r.image_path.name: r for r in reference.records}
    for format, carried in FORMAT_ATTRIBUTES.items():
        out = tmp_path / format
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing of the synthetic data may be lost silently or loudly
            generate_synthetic_dataset(
                out,
                format=format,
                num_images=7,
                seed=2,
                image_size=(128, 96),
                val_fraction=0.3,
                progress=False,
            )
        train = load_dataset(out, format=format, split="train")
        val = load_dataset(out, split="val")  # auto-detected format
        assert (len(train), len(val)) == (5, 2)
        assert train.label_map.names == CLASSES
        for record in (*train.records, *val.records):
            expected = by_name[record.image_path.name]
            np.testing.assert_array_equal(record.boxes, expected.boxes)
            np.testing.assert_array_equal(record.labels, expected.labels)
            assert set(record.attributes) == carried
            attributes, truth = record.attributes, expected.attributes
            if format == "coco":
                np.testing.assert_array_equal(attributes["iscrowd"], truth["iscrowd"])
            if format == "kitti":  # KITTI keeps the occlusion levels and truncated fractions
                np.testing.assert_array_equal(attributes["occluded"], truth["occluded"])
                np.testing.assert_array_equal(attributes["truncated"], truth["truncated"])
            if format == "voc":  # VOC has 0/1 flags
                np.testing.assert_array_equal(attributes["difficult"], truth["difficult"])
                np.testing.assert_array_equal(attributes["occluded"], truth["occluded"] > 0)
                np.testing.assert_array_equal(attributes["truncated"], truth["truncated"] > 0)
            np.testing.assert_array_equal(read_pixels(record.image_path), read_pixels(expected.image_path))


def test_split_sizes():
    assert split_sizes(200, 0.2) == (160, 40)
    assert split_sizes(10, 0.01) == (9, 1)  # a positive fraction gives at least one val image
    assert split_sizes(1, 0.5) == (1, 0)
    assert split_sizes(5, 0.0) == (5, 0)
    assert split_sizes(3, 0.99) == (1, 2)


def test_train_only_when_val_fraction_is_zero(tmp_path):
    out = generate_synthetic_dataset(
        tmp_path / "y",
        format="yolo",
        num_images=3,
        seed=0,
        image_size=(64, 64),
        val_fraction=0.0,
        progress=False,
    )
    assert len(load_dataset(out)) == 3
    assert not (out / "images" / "val").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "pascal"}, r"format 'pascal': expected one of \['coco', 'voc', 'yolo', 'kitti'\]"),
        ({"num_images": 0}, r"num_images=0"),
        ({"seed": -1}, r"seed=-1"),
        ({"image_size": (20, 100)}, r"image_size=\(20, 100\).*at least 32"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        generate_synthetic_dataset(tmp_path / "x", **kwargs)


def test_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match=r"used exists and is not an empty directory"):
        generate_synthetic_dataset(tmp_path / "used", num_images=2, image_size=(64, 64), progress=False)
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]


def test_cli_synth_stats_show(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "data",
                "synth",
                "--format",
                "kitti",
                "--out",
                str(out),
                "--images",
                "8",
                "--seed",
                "4",
                "--size",
                "96x64",
            ]
        )
        == 0
    )
    assert "wrote 8 images in kitti format" in capsys.readouterr().out
    plot = tmp_path / "sizes.png"
    assert main(["data", "stats", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "objects per image" in printed and "attribute occluded" in printed
    assert all(name in printed for name in CLASSES)  # the class table lists every class, even absent ones
    with Image.open(plot) as image:
        assert image.format == "PNG"
    drawn = tmp_path / "show.png"
    assert main(["data", "show", str(out), "--split", "train", "--index", "2", "--out", str(drawn)]) == 0
    with Image.open(drawn) as image:
        assert image.size == (96, 64)
    assert main(["data", "show", str(out), "--index", "99", "--out", str(drawn)]) == 2
    assert "valid indices are 0..7" in capsys.readouterr().err
