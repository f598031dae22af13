"""Torch dataset items, decoding errors, collate padding and masks, seeded loaders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from detr.config import TransformStep
from detr.data.dataset import DetectionDataset
from detr.data.labelmap import LabelMap
from detr.data.loader import Batch, DetectionTorchDataset, build_loader, collate, set_epoch
from detr.data.records import ImageRecord
from detr.data.synth import synthetic_dataset
from detr.data.targets import from_model_boxes
from detr.data.transforms import build_transforms
from detr.errors import DatasetFormatError, InvalidInputError

TRAIN_STEPS = [
    TransformStep(name="random_horizontal_flip", args={"p": 0.5}),
    TransformStep(name="random_crop", args={"min_size": 40, "max_size": 80}),
    TransformStep(name="random_resize", args={"sizes": [48, 56, 64], "max_size": 100}),
    TransformStep(name="normalize"),
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> DetectionDataset:
    return synthetic_dataset(
        tmp_path_factory.mktemp("loader"), 10, seed=1, image_size=(96, 72), progress=False
    )


def record_with_image(path: Path, width: int = 20, height: int = 10, **changes) -> ImageRecord:
    record = ImageRecord(
        image_path=path,
        width=width,
        height=height,
        boxes=np.array([[1, 2, 5, 6]], np.float32),
        labels=np.array([0], np.int64),
        box_sources=("fixture box 0",),
        source="fixture image",
        image_id="x",
    )
    return replace(record, **changes)


def one_record_dataset(record: ImageRecord) -> DetectionDataset:
    return DetectionDataset((record,), LabelMap(("thing",)), "fixture", "coco")


def test_item_without_transforms_matches_the_file_and_record(shapes):
    torch_dataset = DetectionTorchDataset(shapes)
    image, target = torch_dataset[3]
    record = shapes.records[3]
    with Image.open(record.image_path) as pil:
        expected = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert image.dtype == torch.float32 and image.shape == (3, 72, 96)
    torch.testing.assert_close(image, expected)
    torch.testing.assert_close(target["boxes_xyxy"], torch.from_numpy(record.boxes))
    # the model targets are the record's boxes as normalized cxcywh (independent formula)
    b = torch.from_numpy(record.boxes)
    cxcywh = torch.stack(
        [
            (b[:, 0] + b[:, 2]) / 2 / 96,
            (b[:, 1] + b[:, 3]) / 2 / 72,
            (b[:, 2] - b[:, 0]) / 96,
            (b[:, 3] - b[:, 1]) / 72,
        ],
        dim=1,
    )
    torch.testing.assert_close(target["boxes"], cxcywh)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == record.labels.tolist()
    assert target["orig_size"].tolist() == [72, 96] and target["size"].tolist() == [72, 96]
    assert target["orig_size"].dtype == torch.int64
    assert target["image_id"] == record.image_id and target["index"] == 3
    assert target["boxes_removed"] == 0
    assert target["occluded"].tolist() == record.attributes["occluded"].tolist()


def test_resize_keeps_normalized_boxes(shapes):
    resize = build_transforms([TransformStep(name="resize", args={"size": 36})])
    plain = DetectionTorchDataset(shapes)[2][1]
    image, target = DetectionTorchDataset(shapes, resize)[2]
    assert image.shape == (3, 36, 48) and target["size"].tolist() == [36, 48]
    assert target["orig_size"].tolist() == [72, 96]
    torch.testing.assert_close(target["boxes"], plain["boxes"])
    torch.testing.assert_close(from_model_boxes(target["boxes"], (72, 96)), plain["boxes_xyxy"])


def test_removed_boxes_are_counted_with_their_attributes(shapes):
    crop = build_transforms([TransformStep(name="random_crop", args={"min_size": 20, "max_size": 30})])
    torch_dataset = DetectionTorchDataset(shapes, crop)
    removed = 0
    for index in range(len(shapes)):
        _, target = torch_dataset[index]
        n = len(target["labels"])
        assert target["boxes"].shape == (n, 4) and target["occluded"].shape == (n,)
        assert n + target["boxes_removed"] == shapes.records[index].num_boxes
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        removed += target["boxes_removed"]
    assert removed > 0


def test_size_mismatch_names_the_file(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (20, 10)).save(path)
    dataset = one_record_dataset(record_with_image(path, width=30, height=10))
    with pytest.raises(
        DatasetFormatError,
        match=r"img\.png: image is 20x10 pixels but the annotation at fixture image says 30x10",
    ):
        DetectionTorchDataset(dataset)[0]


@pytest.mark.parametrize(
    "content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated"]
)
def test_corrupt_image_names_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    if content == "truncated":
        Image.new("RGB", (20, 10), (200, 10, 10)).save(path)
        content = path.read_bytes()[:-30]
    path.write_bytes(content)
    with pytest.raises(
        DatasetFormatError, match=r"broken\.png: cannot decode image .*listed at fixture image"
    ):
        DetectionTorchDataset(one_record_dataset(record_with_image(path)))[0]


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"gone\.jpg: image file not found"):
        DetectionTorchDataset(one_record_dataset(record_with_image(tmp_path / "gone.jpg")))[0]


def test_grey_and_bmp_images_become_rgb(tmp_path):
    path = tmp_path / "grey.bmp"
    Image.new("L", (20, 10), 77).save(path)
    image, _ = DetectionTorchDataset(one_record_dataset(record_with_image(path)))[0]
    assert image.shape == (3, 10, 20)
    torch.testing.assert_close(image, torch.full((3, 10, 20), 77 / 255))


def test_collate_pads_and_masks():
    a = torch.rand(3, 4, 6)
    b = torch.rand(3, 5, 3)
    batch = collate([(a, {"id": 0}), (b, {"id": 1})])
    assert isinstance(batch, Batch)
    images, masks, targets = batch
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6) and masks.dtype == torch.bool
    torch.testing.assert_close(images[0, :, :4, :6], a)
    torch.testing.assert_close(images[1, :, :5, :3], b)
    assert (images[0, :, 4:] == 0).all() and (images[1, :, :, 3:] == 0).all()
    expected_mask = torch.ones(2, 5, 6, dtype=torch.bool)
    expected_mask[0, :4, :6] = False
    expected_mask[1, :5, :3] = False
    assert torch.equal(masks, expected_mask)
    assert [t["id"] for t in targets] == [0, 1]
    padded = collate([(a, {}), (b, {})], size_divisibility=4)
    assert padded.images.shape == (2, 3, 8, 8)
    assert (
        padded.masks[0, :4, :6].logical_not().all()
        and padded.masks[0, 4:].all()
        and padded.masks[0, :, 6:].all()
    )
    with pytest.raises(InvalidInputError):
        collate([])


def batches_of(loader, epoch=0):
    set_epoch(loader, epoch)
    return [
        (images.clone(), masks.clone(), [t["index"] for t in targets], [t["boxes"].clone() for t in targets])
        for images, masks, targets in loader
    ]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (ia, ma, xa, ba), (ib, mb, xb, bb) in zip(first, second):
        assert xa == xb and torch.equal(ia, ib) and torch.equal(ma, mb)
        assert all(torch.equal(p, q) for p, q in zip(ba, bb))


def test_loader_is_a_function_of_seed_and_epoch(shapes):
    transforms = build_transforms(TRAIN_STEPS)

    def make(seed, workers=0):
        return build_loader(shapes, transforms, batch_size=3, shuffle=True, num_workers=workers, seed=seed)

    torch.manual_seed(123)
    first = batches_of(make(5))
    torch.manual_seed(999)  # the global RNG does not matter
    again = batches_of(make(5))
    assert_same_batches(first, again)
    assert sorted(i for _, _, idx, _ in first for i in idx) == list(range(10))
    assert [idx for _, _, idx, _ in batches_of(make(6))] != [idx for _, _, idx, _ in first]
    epoch1 = batches_of(make(5), epoch=1)
    assert [idx for _, _, idx, _ in epoch1] != [idx for _, _, idx, _ in first]
    # two worker processes produce exactly what the main process does
    assert_same_batches(batches_of(make(5, workers=2)), first)
    # the caller's RNG state is left alone
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    batches_of(make(5))
    assert torch.equal(torch.rand(3), expected)


def test_loader_without_shuffle_keeps_order(shapes):
    loader = build_loader(shapes, None, batch_size=4, shuffle=False)
    order = [t["index"] for _, _, targets in loader for t in targets]
    assert order == list(range(10))
    assert [len(targets) for _, _, targets in loader] == [4, 4, 2]


def test_distributed_sampler_splits_the_data(shapes):
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(range(len(shapes)), num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = build_loader(shapes, None, batch_size=2, shuffle=False, sampler=sampler, seed=3)
        seen += [t["index"] for _, _, targets in loader for t in targets]
    assert sorted(seen) == list(range(10))
    with pytest.raises(InvalidInputError, match="shuffle=True together with a sampler"):
        build_loader(shapes, None, batch_size=2, shuffle=True, sampler=sampler)


def test_loader_argument_errors(shapes):
    with pytest.raises(InvalidInputError, match="batch_size=0"):
        build_loader(shapes, None, batch_size=0, shuffle=False)
    empty = DetectionDataset((), shapes.label_map, "empty", "coco")
    with pytest.raises(InvalidInputError, match="'empty' has no images"):
        build_loader(empty, None, batch_size=1, shuffle=False)


def test_batch_to_moves_tensors():
    batch = collate([(torch.rand(3, 2, 2), {"labels": torch.tensor([1]), "image_id": "a"})])
    moved = batch.to("cpu")
    assert moved.targets[0]["image_id"] == "a" and torch.equal(moved.targets[0]["labels"], torch.tensor([1]))


def test_sampler_epoch_drives_the_augmentations(shapes):
    """A training loop only calls ``sampler.set_epoch``; the augmentation draw follows it."""
    transforms = build_transforms(TRAIN_STEPS)
    loader = build_loader(shapes, transforms, batch_size=5, shuffle=False, seed=2)

    def draw():
        return [t["boxes"].clone() for _, _, targets in loader for t in targets]

    epoch0 = draw()
    loader.sampler.set_epoch(1)
    epoch1 = draw()
    loader.sampler.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(draw(), epoch0))
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    # a sampler passed in by the caller (a distributed or resumable one) drives it the same way
    sampler = DistributedSampler(range(len(shapes)), num_replicas=1, rank=0, shuffle=False, seed=2)
    custom = build_loader(shapes, transforms, batch_size=5, shuffle=False, sampler=sampler, seed=2)
    sampler.set_epoch(1)
    assert all(
        torch.equal(a, t["boxes"]) for a, t in zip(epoch1, (t for _, _, targets in custom for t in targets))
    )
