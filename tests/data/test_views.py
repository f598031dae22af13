"""Views: each filter keeps exactly the boxes/images it should and reports what it dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detr.config import DropSpec, ViewSpec
from detr.data import DetectionDataset, ImageRecord, LabelMap, apply_view, load_dataset
from detr.errors import ConfigError

CAR, PED, CYC = 0, 1, 2


def record(image_id: str, boxes, labels, **attributes) -> ImageRecord:
    n = len(labels)
    return ImageRecord(
        image_path=Path(f"/data/{image_id}.png"), width=100, height=100,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.asarray(labels, np.int64),
        box_sources=tuple(f"{image_id}.txt:{i + 1}" for i in range(n)), source=f"{image_id}.txt",
        image_id=image_id, attributes={k: np.asarray(v, dtype=np.asarray(v).dtype) for k, v in attributes.items()},
    )


@pytest.fixture
def dataset() -> DetectionDataset:
    records = (
        record("r0", [[0, 0, 10, 10], [0, 0, 3, 3], [5, 5, 20, 20]], [CAR, CAR, PED],
               difficult=np.array([False, False, True]), occluded=np.array([0, 2, 3]),
               truncated=np.array([0.0, 0.5, 0.1], np.float32)),
        record("r1", [[0, 0, 50, 50], [1, 1, 30, 30]], [CAR, CAR], iscrowd=np.array([False, True])),
        record("r2", [], []),
        record("r3", [[0, 0, 10, 10]], [CYC]),
    )
    return DetectionDataset(records, LabelMap(("Car", "Pedestrian", "Cyclist")), "toy", "kitti")


def kept_boxes(view_dataset) -> dict[str, list[int]]:
    return {r.image_id: r.labels.tolist() for r in view_dataset}


def test_default_view_keeps_everything(dataset):
    viewed = apply_view(dataset, ViewSpec())
    assert kept_boxes(viewed) == kept_boxes(dataset)
    assert viewed.report.counts == {}
    assert "kept 4/4 images and 6/6 boxes" in viewed.report.notes[-1]


def test_include_and_exclude_labels(dataset):
    viewed = apply_view(dataset, ViewSpec(include_labels=["Car"]))
    assert kept_boxes(viewed) == {"r0": [CAR, CAR], "r1": [CAR, CAR], "r2": [], "r3": []}
    assert viewed.label_map == dataset.label_map  # a view removes boxes, never classes
    assert viewed.report.counts == {"view: dropped 'Pedestrian' box, not in include_labels": 1,
                                    "view: dropped 'Cyclist' box, not in include_labels": 1}
    assert viewed.report.examples["view: dropped 'Pedestrian' box, not in include_labels"] == ("r0.txt:3",)
    excluded = apply_view(dataset, ViewSpec(exclude_labels=["Car", "Cyclist"]))
    assert kept_boxes(excluded) == {"r0": [PED], "r1": [], "r2": [], "r3": []}
    assert excluded.report.count("view:") == 5


@pytest.mark.parametrize("field", ["include_labels", "exclude_labels", "require"])
def test_unknown_class_names_are_errors(dataset, field):
    value = {"Truck": 1} if field == "require" else ["Truck"]
    with pytest.raises(ConfigError, match=rf"view\.{field}: unknown classes \['Truck'\].*"
                                          r"known classes: \['Car', 'Pedestrian', 'Cyclist'\]"):
        apply_view(dataset, ViewSpec(**{field: value}))


def test_attribute_filters(dataset):
    assert kept_boxes(apply_view(dataset, ViewSpec(drop=DropSpec(difficult=True))))["r0"] == [CAR, CAR]
    crowd = apply_view(dataset, ViewSpec(drop=DropSpec(crowd=True)))
    np.testing.assert_array_equal(crowd[1].boxes, [[0, 0, 50, 50]])
    assert crowd.report.counts == {"view: dropped 'Car' box, crowd (iscrowd)": 1}
    occluded = apply_view(dataset, ViewSpec(drop=DropSpec(occluded_above=1)))
    assert kept_boxes(occluded)["r0"] == [CAR]
    truncated = apply_view(dataset, ViewSpec(drop=DropSpec(truncated_above=0.2)))
    assert kept_boxes(truncated)["r0"] == [CAR, PED]
    assert truncated.report.counts == {"view: dropped 'Car' box, truncated > 0.2": 1}
    # the surviving box keeps its own attributes and source
    assert truncated[0].box_sources == ("r0.txt:1", "r0.txt:3")
    np.testing.assert_array_equal(truncated[0].attributes["occluded"], [0, 3])


def test_filter_without_the_attribute_says_so(dataset):
    only_r3 = DetectionDataset(dataset.records[3:], dataset.label_map, "toy", "yolo")
    viewed = apply_view(only_r3, ViewSpec(drop=DropSpec(difficult=True)))
    assert len(viewed) == 1 and any("'difficult' filter has no effect" in n for n in viewed.report.notes)


def test_min_box_size(dataset):
    viewed = apply_view(dataset, ViewSpec(min_box_size=5))
    assert kept_boxes(viewed)["r0"] == [CAR, PED]
    assert viewed.report.counts == {"view: dropped 'Car' box, smaller than min_box_size = 5 px": 1}


def test_require_counts_after_box_filters(dataset):
    assert list(kept_boxes(apply_view(dataset, ViewSpec(require={"Car": 2})))) == ["r0", "r1"]
    both = apply_view(dataset, ViewSpec(require={"Car": 2}, min_box_size=5))
    assert list(kept_boxes(both)) == ["r1"]
    assert both.report.count("view: dropped image") == 3
    assert list(kept_boxes(apply_view(dataset, ViewSpec(require={"Car": 1, "Pedestrian": 1})))) == ["r0"]


def test_drop_empty_and_max_images(dataset):
    viewed = apply_view(dataset, ViewSpec(include_labels=["Cyclist"], drop_empty_images=True))
    assert list(kept_boxes(viewed)) == ["r3"]
    assert viewed.report.counts["view: dropped image without boxes (drop_empty_images)"] == 3
    first_two = apply_view(dataset, ViewSpec(max_images=2))
    assert list(kept_boxes(first_two)) == ["r0", "r1"]
    assert first_two.report.counts == {"view: dropped image beyond max_images = 2": 2}


def test_view_through_load_dataset(kitti_dir):
    viewed = load_dataset(kitti_dir, view=ViewSpec(include_labels=["Car", "Pedestrian"], require={"Car": 1}))
    assert [r.image_id for r in viewed] == ["000000"]
    assert viewed[0].labels.tolist() == [1, 0]
    assert viewed.report.count("view: dropped image") == 1
