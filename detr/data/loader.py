"""From records to batches: image decoding, transforms, model targets, padding.

One item is ``(image, target)``: ``image`` float32 [3, H, W] (after the transform pipeline; pixels
in [0, 1] unless the pipeline normalized them) and ``target`` a dict:

* ``boxes`` float32 [N, 4] normalized cxcywh of the transformed image (model targets, made by
  :func:`detr.data.targets.to_model_targets`), ``boxes_xyxy`` float32 [N, 4] the same in pixels;
* ``labels`` int64 [N]; per-box attributes of the record (``iscrowd``, ``difficult``, ...) [N];
* ``image_id`` (the record's id, int or str), ``index`` int (position in the dataset);
* ``orig_size`` int64 [2] (H, W) of the file, ``size`` int64 [2] (H, W) after the transforms;
* ``boxes_removed`` int: boxes the transforms removed (left the crop), so nothing goes uncounted.

Augmentation randomness is a pure function of ``(seed, epoch, index)``: each item runs its transforms
under its own torch seed (the global RNG is restored afterwards), so batches are the same with 0 or
8 workers, on one process or many, and a resumed run sees what the interrupted one would have. In a
loader from :func:`build_loader` the epoch is the sampler's, so ``sampler.set_epoch`` is all a
training loop calls; worker processes start per epoch (no ``persistent_workers``) and so see it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detr.data.dataset import DetectionDataset
from detr.data.records import ImageRecord
from detr.data.targets import to_model_targets
from detr.errors import DatasetFormatError, InvalidInputError

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[tv_tensors.Image, dict[str, Any]]]

# PIL decodes every common image format; torchvision.io's decoders are deprecated since 0.29.
# Decoding problems PIL reports: unknown format (UnidentifiedImageError, an OSError), truncated
# data (OSError), broken PNG chunks (SyntaxError), absurd sizes (DecompressionBombError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_rgb_image(record: ImageRecord) -> torch.Tensor:
    """uint8 [3, H, W] RGB pixels of ``record``'s file, checked against the record's size."""
    path = Path(record.image_path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: image file not found (listed at {record.source})")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8; decodes the whole file
    except DECODE_ERRORS as e:
        raise DatasetFormatError(f"{path}: cannot decode image ({e}); listed at {record.source}") from None
    height, width = pixels.shape[:2]
    if (height, width) != (record.height, record.width):
        raise DatasetFormatError(
            f"{path}: image is {width}x{height} pixels but the annotation at {record.source} says "
            f"{record.width}x{record.height}; fix the annotation's width/height or the image"
        )
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of one item's augmentation."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class DetectionTorchDataset(Dataset):
    """A torch ``Dataset`` over a :class:`DetectionDataset`; see the module docstring for items."""

    def __init__(
        self, dataset: DetectionDataset, transforms: Transforms | None = None, *, seed: int = 0
    ) -> None:
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0
        # An object with an ``epoch`` attribute (the loader's sampler) that takes over ``self.epoch``.
        self.epoch_source: Any = None

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draw of an epoch (used when no ``epoch_source`` is linked)."""
        self.epoch = epoch

    @property
    def current_epoch(self) -> int:
        return int(self.epoch_source.epoch) if self.epoch_source is not None else self.epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.dataset.records[index]
        pixels = read_rgb_image(record)
        image = tv_tensors.Image(pixels)
        height, width = record.height, record.width
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(record.boxes.copy()), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(record.labels.copy()),
        }
        for name, values in record.attributes.items():
            target[name] = torch.from_numpy(np.asarray(values).copy())
        num_boxes = record.num_boxes
        if self.transforms is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.current_epoch, index))
                image, target = self.transforms(image, target)
        if not image.is_floating_point():
            image = F.to_dtype(image, torch.float32, scale=True)
        new_h, new_w = image.shape[-2:]
        boxes_xyxy = target.pop("boxes").as_subclass(torch.Tensor).float()  # [N, 4] pixels
        target.update(
            boxes=to_model_targets(boxes_xyxy, (new_h, new_w)),  # [N, 4] normalized cxcywh
            boxes_xyxy=boxes_xyxy,
            image_id=record.image_id,
            index=index,
            orig_size=torch.tensor([height, width], dtype=torch.int64),
            size=torch.tensor([new_h, new_w], dtype=torch.int64),
            boxes_removed=num_boxes - len(boxes_xyxy),
        )
        return image.as_subclass(torch.Tensor), target


class Batch(NamedTuple):
    """``images`` float [B, 3, H, W] zero-padded at the bottom/right; ``masks`` bool [B, H, W] True on
    padding (DETR's convention); ``targets`` one dict per image."""

    images: torch.Tensor
    masks: torch.Tensor
    targets: list[dict[str, Any]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(value: Any) -> Any:
            return value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value

        return Batch(
            move(self.images),
            move(self.masks),
            [{k: move(v) for k, v in t.items()} for t in self.targets],
        )


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]], *, size_divisibility: int = 1) -> Batch:
    """Pad images to the largest height and width of the batch (rounded up to ``size_divisibility``)."""
    if not batch:
        raise InvalidInputError("cannot collate an empty batch")
    images = [image for image, _ in batch]
    max_h = max(image.shape[-2] for image in images)
    max_w = max(image.shape[-1] for image in images)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    first = images[0]
    padded = first.new_zeros((len(images), first.shape[0], max_h, max_w))  # [B, 3, H, W]
    masks = torch.ones((len(images), max_h, max_w), dtype=torch.bool)  # [B, H, W], True = padding
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        padded[i, :, :h, :w] = image
        masks[i, :h, :w] = False
    return Batch(padded, masks, [target for _, target in batch])


def build_loader(
    dataset: DetectionDataset | DetectionTorchDataset,
    transforms: Transforms | None,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    seed: int = 0,
    *,
    drop_last: bool = False,
    size_divisibility: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of :class:`Batch` es whose order and augmentations depend only on ``seed``
    and the sampler's epoch (``loader.sampler.set_epoch(epoch)`` or :func:`set_epoch`).

    Without ``sampler`` the order comes from a one-replica ``DistributedSampler(shuffle, seed)``;
    pass a ``DistributedSampler`` or a resumable sampler for data-parallel training (it then
    decides shuffling, so ``shuffle`` must be False). A sampler with an ``epoch`` attribute also
    sets the augmentation epoch.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size={batch_size}: expected a positive integer")
    if num_workers < 0:
        raise InvalidInputError(f"num_workers={num_workers}: expected 0 or more")
    if isinstance(dataset, DetectionTorchDataset):
        if transforms is not None and transforms is not dataset.transforms:
            raise InvalidInputError(
                "give transforms either to DetectionTorchDataset or to build_loader, not both"
            )
        torch_dataset = dataset
    else:
        torch_dataset = DetectionTorchDataset(dataset, transforms, seed=seed)
    if len(torch_dataset) == 0:
        raise InvalidInputError(
            f"dataset {getattr(torch_dataset.dataset, 'name', '')!r} has no images to load"
        )
    if sampler is None:
        sampler = DistributedSampler(torch_dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
    elif shuffle:
        raise InvalidInputError(
            "shuffle=True together with a sampler: the sampler decides the order; "
            "use DistributedSampler(..., shuffle=True) and shuffle=False"
        )
    if hasattr(sampler, "epoch"):
        torch_dataset.epoch_source = sampler
    return DataLoader(
        torch_dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=partial(collate, size_divisibility=size_divisibility),
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select ``epoch``'s order and augmentations (call before iterating each epoch)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if isinstance(loader.dataset, DetectionTorchDataset):
        loader.dataset.set_epoch(epoch)  # for a sampler without an ``epoch`` attribute
