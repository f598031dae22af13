"""Statistics of a hand-built dataset (numbers computed by hand), the plot, and drawn records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr.data.dataset import DatasetReport, DetectionDataset
from detr.data.labelmap import LabelMap
from detr.data.records import ImageRecord
from detr.data.show import IGNORE_COLOUR, box_captions, class_colour, draw_record, save_drawn_record
from detr.data.stats import compute_stats, plot_box_sizes
from detr.errors import InvalidInputError


def hex_rgb(colour: str) -> list[int]:
    return [int(colour[i : i + 2], 16) for i in (1, 3, 5)]


def make_record(
    tmp: Path, name: str, width: int, height: int, boxes, labels, attributes=None, ignore=None
) -> ImageRecord:
    path = tmp / f"{name}.png"
    generator = np.random.default_rng(len(name) + width)
    Image.fromarray(generator.integers(0, 120, (height, width, 3), dtype=np.uint8)).save(path)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return ImageRecord(
        image_path=path,
        width=width,
        height=height,
        boxes=boxes,
        labels=np.asarray(labels, np.int64),
        box_sources=tuple(f"{name} box {i}" for i in range(len(boxes))),
        source=name,
        image_id=name,
        attributes=attributes or {},
        ignore_regions=np.asarray(ignore if ignore is not None else np.zeros((0, 4)), np.float32).reshape(
            -1, 4
        ),
    )


@pytest.fixture
def handmade(tmp_path) -> DetectionDataset:
    a = make_record(
        tmp_path,
        "a",
        100,
        80,
        # sqrt areas: 10 (small), 40 (medium), sqrt(8000) = 89.4 (medium)
        [[0, 0, 10, 10], [10, 10, 50, 50], [0, 0, 100, 80]],
        [0, 1, 0],
        {
            "difficult": np.array([True, False, False]),
            "iscrowd": np.array([False, False, True]),
            "occluded": np.array([0, 2, 1]),
            "truncated": np.array([0.0, 0.25, 0.7], np.float32),
        },
    )
    b = make_record(
        tmp_path,
        "b",
        60,
        40,
        [],
        [],
        {
            "difficult": np.zeros(0, bool),
            "iscrowd": np.zeros(0, bool),
            "occluded": np.zeros(0, np.int64),
            "truncated": np.zeros(0, np.float32),
        },
        ignore=[[0, 0, 30, 20], [40, 10, 60, 40]],
    )
    c = make_record(
        tmp_path, "c", 300, 200, [[0, 0, 200, 150]], [0], ignore=[[250, 0, 300, 50]]
    )  # sqrt 173.2
    report = DatasetReport(
        counts={"view: dropped box (difficult)": 4}, examples={"view: dropped box (difficult)": ("x.xml",)}
    )
    return DetectionDataset((a, b, c), LabelMap(("cat", "dog", "bird")), "hand", "mixed", report)


def test_stats_numbers(handmade):
    stats = compute_stats(handmade)
    assert stats.num_images == 3 and stats.num_boxes == 4
    assert stats.boxes_per_class.tolist() == [3, 1, 0]
    assert stats.images_per_class.tolist() == [2, 1, 0]
    assert stats.objects_per_image.tolist() == [3, 0, 1]
    assert stats.images_without_boxes == 1
    assert stats.objects_per_image_histogram() == {"0": 1, "1": 1, "3": 1}
    np.testing.assert_allclose(sorted(stats.box_sqrt_areas), [10, 40, np.sqrt(8000), np.sqrt(30000)])
    assert stats.coco_scales == {"small (0-32)": 1, "medium (32-96)": 2, "large (>= 96)": 1}
    assert {k: v for k, v in stats.size_bins.items() if v} == {
        "8-16": 1,
        "32-48": 1,
        "64-96": 1,
        "128-256": 1,
    }
    assert stats.attribute_counts == {
        "iscrowd": {"yes": 1, "no": 2, "not recorded": 1},
        "difficult": {"yes": 1, "no": 2, "not recorded": 1},
        "occluded": {"level 0": 1, "level 1": 1, "level 2": 1, "not recorded": 1},
        "truncated": {"none": 1, "(0, 0.3]": 1, "(0.3, 0.6]": 0, "(0.6, 1]": 1, "not recorded": 1},
    }
    assert (stats.ignore_regions, stats.images_with_ignore_regions) == (3, 2)


def test_stats_table_shows_counts_and_the_view_report(handmade):
    text = compute_stats(handmade).format()
    assert text.startswith("dataset hand (mixed): 3 images, 4 boxes, 3 classes")
    assert "objects per image: min 0, mean 1.33, max 3; images without boxes: 1" in text
    lines = text.splitlines()
    cat = next(line for line in lines if line.strip().startswith("cat "))
    assert cat.split() == ["cat", "3", "75.0%", "2"]
    bird = next(line for line in lines if line.strip().startswith("bird "))
    assert bird.split() == ["bird", "0", "0.0%", "0"]
    assert any(line.split()[:3] == ["small", "(0-32)", "1"] for line in lines)
    assert "ignore regions: 3 in 2 images" in text
    assert "view: dropped box (difficult)" in text and "x.xml" in text


def test_stats_of_an_empty_dataset():
    stats = compute_stats(DetectionDataset((), LabelMap(("a",)), "empty", "coco"))
    assert stats.num_images == 0 and stats.num_boxes == 0
    assert "0 images, 0 boxes" in stats.format()


def test_plot_is_a_png(handmade, tmp_path):
    path = plot_box_sizes(compute_stats(handmade), tmp_path / "plots" / "sizes.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1100, 400)


def test_captions_list_set_attributes(handmade):
    assert box_captions(handmade.records[0], handmade.label_map.names) == [
        "cat difficult",
        "dog occ=2 trunc=0.25",
        "cat crowd occ=1 trunc=0.7",
    ]
    assert box_captions(handmade.records[2], handmade.label_map.names) == ["cat"]


def test_draw_record_draws_boxes_in_class_colours(handmade):
    record = handmade.records[0]
    with Image.open(record.image_path) as pil:
        original = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    drawn = draw_record(handmade, 0)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 80, 100)
    assert drawn[:, 30, 50].tolist() == hex_rgb(class_colour(1))  # right edge of the dog box (x2 = 50)
    assert drawn[:, 60, 99].tolist() == hex_rgb(class_colour(0))  # right edge of the full-image cat box
    assert torch.equal(drawn[:, 65, 70], original[:, 65, 70])  # inside every box, away from edges and text


def test_ignore_regions_are_greyed(handmade):
    record = handmade.records[1]
    with Image.open(record.image_path) as pil:
        original = torch.from_numpy(np.array(pil)).permute(2, 0, 1).int()
    drawn = draw_record(handmade, 1).int()
    grey = torch.tensor(hex_rgb(IGNORE_COLOUR)).view(3, 1, 1)
    inside = (slice(None), slice(12, 18), slice(5, 25))  # inside the first region, below its label
    assert (drawn[inside] - grey).abs().sum() < (original[inside] - grey).abs().sum()
    assert torch.equal(drawn[:, 30:, :35], original[:, 30:, :35])  # outside both regions


def test_save_drawn_record_writes_the_png(handmade, tmp_path):
    out = save_drawn_record(handmade, 2, tmp_path / "out" / "c.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (300, 200)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert torch.equal(pixels, draw_record(handmade, 2))


@pytest.mark.parametrize("index", [3, -1, 10])
def test_index_out_of_range(handmade, index):
    with pytest.raises(
        InvalidInputError,
        match=rf"index {index} is out of range: dataset 'hand' has 3 images, valid indices are 0\.\.2",
    ):
        draw_record(handmade, index)


def test_objects_per_image_buckets(tmp_path):
    def record(n: int, name: str) -> ImageRecord:
        boxes = np.tile(np.array([[0, 0, 4, 4]], np.float32), (n, 1))
        return ImageRecord(
            image_path=tmp_path / f"{name}.png",
            width=8,
            height=8,
            boxes=boxes,
            labels=np.zeros(n, np.int64),
            box_sources=("b",) * n,
            source=name,
            image_id=name,
        )

    dataset = DetectionDataset(
        tuple(record(n, f"r{i}") for i, n in enumerate([9, 12, 19, 150])), LabelMap(("a",)), "many", "coco"
    )
    stats = compute_stats(dataset)
    assert stats.objects_per_image_histogram() == {"9": 1, "10-19": 2, "100+": 1}
    assert "objects per image: min 9, mean 47.50, max 150" in stats.format()
