"""Transform pipelines: hand-computed geometry, box filtering with labels and attributes, seeding,
and config errors that name the step."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from detr.config import TransformsSpec, TransformStep
from detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_split_transforms, build_transforms
from detr.errors import ConfigError

H, W = 100, 200
BOXES = [[10.0, 20.0, 50.0, 60.0], [150.0, 0.0, 200.0, 10.0], [0.0, 90.0, 30.0, 100.0]]


def sample(height: int = H, width: int = W, boxes=BOXES, dtype=torch.uint8):
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    else:
        pixels = torch.rand(3, height, width, generator=generator)
    n = len(boxes)
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.arange(n, dtype=torch.int64) + 1,
        "occluded": torch.arange(n, dtype=torch.int64) % 3,
        "truncated": torch.linspace(0, 0.5, n),
        "difficult": torch.arange(n) % 2 == 1,
    }
    return tv_tensors.Image(pixels), target


def steps(*pairs):
    return [TransformStep(name=name, args=args) for name, args in pairs]


def test_flip_moves_boxes_and_pixels_together():
    image, target = sample()
    out_image, out = build_transforms(steps(("random_horizontal_flip", {"p": 1.0})))(image, target)
    torch.testing.assert_close(out_image.as_subclass(torch.Tensor), image.flip(-1).as_subclass(torch.Tensor))
    # x' = W - x, swapped: [10, 20, 50, 60] -> [150, 20, 190, 60]
    expected = torch.tensor([[150.0, 20, 190, 60], [0, 0, 50, 10], [170, 90, 200, 100]])
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), expected)
    torch.testing.assert_close(out["labels"], target["labels"])
    assert (
        build_transforms(steps(("random_horizontal_flip", {"p": 0.0})))(image, target)[1]["boxes"].tolist()
        == BOXES
    )


def test_resize_scales_shorter_side():
    image, target = sample()
    out_image, out = build_transforms(steps(("resize", {"size": 50})))(image, target)
    assert out_image.shape == (3, 50, 100)
    assert out["boxes"].canvas_size == (50, 100)
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor(BOXES) * 0.5)


def test_resize_caps_longer_side():
    image, target = sample()
    # shorter side 80 would make the longer 160 > 120, so the longer side becomes 120 (scale 0.6)
    out_image, out = build_transforms(steps(("resize", {"size": 80, "max_size": 120})))(image, target)
    assert out_image.shape == (3, 60, 120)
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor(BOXES) * 0.6)


@pytest.mark.parametrize("size", [(1, 1000), (1000, 1), (2, 500), (500, 2), (1, 1), (3, 2000), (7, 129)])
def test_resize_keeps_every_side_at_least_one_pixel(size):
    """torchvision rounds a strip's shorter side down to 0 (128 * 1 / 1000); the model cannot run on that."""
    height, width = size
    image, target = sample(height, width, boxes=[[0.0, 0.0, float(width), float(height)]])
    out_image, out = build_transforms(steps(("resize", {"size": 96, "max_size": 128})))(image, target)
    out_h, out_w = out_image.shape[-2:]
    assert min(out_h, out_w) >= 1 and max(out_h, out_w) <= 128
    assert out["boxes"].canvas_size == (out_h, out_w)
    torch.manual_seed(0)
    out_image, _ = build_transforms(steps(("random_resize", {"sizes": [96], "max_size": 128})))(image, target)
    assert min(out_image.shape[-2:]) >= 1


@pytest.mark.parametrize("size", [(100, 200), (480, 640), (640, 480), (37, 91), (96, 96), (1080, 1920), (5, 3)])
@pytest.mark.parametrize(("short", "cap"), [(96, 128), (800, 1333), (50, None)])
def test_resize_equals_torchvision_where_no_side_vanishes(size, short, cap):
    from torchvision.transforms import v2

    image, target = sample(*size)
    ours, _ = build_transforms(steps(("resize", {"size": short, "max_size": cap})))(image, target)
    reference = v2.Resize(short, max_size=cap, antialias=True)(image)
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), reference.as_subclass(torch.Tensor))


def test_random_resize_draws_from_sizes_and_keeps_boxes_consistent():
    pipeline = build_transforms(steps(("random_resize", {"sizes": [40, 60, 80], "max_size": 150})))
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = sample()
        out_image, out = pipeline(image, target)
        h, w = out_image.shape[-2:]
        seen.add(h)
        assert h in (40, 60, 75) and w == 2 * h  # 80 -> 160 > 150 is capped to 75 x 150
        torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor(BOXES) * (h / H))
    assert seen == {40, 60, 75}


def test_random_crop_clips_and_removes_boxes_with_their_attributes():
    # Pixel values encode coordinates so the crop offset can be read back from the output.
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij"
    )
    pixels = torch.stack([xs, ys, torch.zeros_like(xs)])
    pipeline = build_transforms(steps(("random_crop", {"min_size": 30, "max_size": 90})))
    removed_total = 0
    for seed in range(30):
        torch.manual_seed(seed)
        _, target = sample()
        out_image, out = pipeline(tv_tensors.Image(pixels.clone()), target)
        ch, cw = out_image.shape[-2:]
        assert 30 <= ch <= 90 and 30 <= cw <= 90
        left, top = int(out_image[0, 0, 0]), int(out_image[1, 0, 0])
        shifted = torch.tensor(BOXES) - torch.tensor([left, top, left, top])
        clipped = torch.stack(
            [
                shifted[:, 0].clamp(0, cw),
                shifted[:, 1].clamp(0, ch),
                shifted[:, 2].clamp(0, cw),
                shifted[:, 3].clamp(0, ch),
            ],
            dim=1,
        )
        keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
        torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), clipped[keep])
        for key in ("labels", "occluded", "truncated", "difficult"):
            torch.testing.assert_close(out[key], target[key][keep])
        removed_total += int((~keep).sum())
    assert removed_total > 0  # the crop does remove boxes over these seeds


def test_random_crop_on_an_image_without_boxes():
    image, target = sample(boxes=[])
    out_image, out = build_transforms(steps(("random_crop", {"min_size": 10, "max_size": 20})))(image, target)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    assert 10 <= out_image.shape[-1] <= 20


def test_random_select_probability_picks_a_branch():
    select = {
        "first": [{"name": "resize", "args": {"size": 50}}],
        "second": [{"name": "resize", "args": {"size": 20}}],
    }
    image, target = sample()
    assert build_transforms(steps(("random_select", {**select, "p": 1.0})))(image, target)[0].shape[-2] == 50
    assert build_transforms(steps(("random_select", {**select, "p": 0.0})))(image, target)[0].shape[-2] == 20


def test_normalize_converts_uint8_and_uses_imagenet_defaults():
    image, target = sample()
    out_image, out = build_transforms(steps(("normalize", {})))(image, target)
    assert out_image.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (image.as_subclass(torch.Tensor).float() / 255 - mean) / std
    torch.testing.assert_close(out_image.as_subclass(torch.Tensor), expected)
    assert out["boxes"].tolist() == BOXES


def test_to_dtype_and_color_jitter_touch_pixels_only():
    image, target = sample()
    pipeline = build_transforms(
        steps(
            ("to_dtype", {"dtype": "float32"}),
            ("color_jitter", {"brightness": 0.5, "contrast": [0.5, 1.5], "hue": 0.1}),
            ("photometric", {"p": 1.0}),
        )
    )
    torch.manual_seed(0)
    out_image, out = pipeline(image, target)
    assert out_image.dtype == torch.float32 and out_image.shape == image.shape
    assert not torch.allclose(
        out_image.as_subclass(torch.Tensor), image.as_subclass(torch.Tensor).float() / 255
    )
    assert out["boxes"].tolist() == BOXES and out["labels"].tolist() == [1, 2, 3]


def test_seeded_pipelines_repeat_exactly():
    detr_train = steps(
        ("random_horizontal_flip", {"p": 0.5}),
        (
            "random_select",
            {
                "first": [{"name": "random_resize", "args": {"sizes": [48, 64, 80], "max_size": 200}}],
                "second": [
                    {"name": "random_resize", "args": {"sizes": [60, 70]}},
                    {"name": "random_crop", "args": {"min_size": 30, "max_size": 60}},
                    {"name": "random_resize", "args": {"sizes": [48, 64, 80], "max_size": 200}},
                ],
            },
        ),
        ("color_jitter", {"brightness": 0.3, "saturation": 0.3, "p": 0.5}),
        ("normalize", {}),
    )
    pipeline = build_transforms(detr_train)

    def run(seed):
        torch.manual_seed(seed)
        results = []
        for _ in range(6):
            image, target = sample()
            out_image, out = pipeline(image, target)
            results.append((out_image.as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor)))
        return results

    first, again, other = run(3), run(3), run(4)
    for (ia, ba), (ib, bb) in zip(first, again):
        assert torch.equal(ia, ib) and torch.equal(ba, bb)
    assert any(ia.shape != ib.shape or not torch.equal(ia, ib) for (ia, _), (ib, _) in zip(first, other))


def test_default_config_pipelines_build():
    spec = TransformsSpec()
    image, target = sample()
    train_image, _ = build_split_transforms(spec, "train")(image, target)
    val_image, val_target = build_split_transforms(spec, "val")(image, target)
    assert train_image.dtype == torch.float32
    assert min(val_image.shape[-2:]) == 500  # 544 would make the longer side 1088 > 1000
    assert val_target["boxes"].canvas_size == tuple(val_image.shape[-2:])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            [{"name": "flip"}],
            r"data\.transforms\.train\[0\]: unknown transform 'flip'.*accepted: resize, random_resize",
        ),
        (
            [{"name": "normalize"}, {"name": "resize", "args": {"sz": 3}}],
            r"data\.transforms\.train\[1\]: transform 'resize': missing argument 'size'; "
            r"unknown argument 'sz'; accepted arguments: size, max_size",
        ),
        (
            [{"name": "resize", "args": {"size": 800, "max_size": 600}}],
            r"\[0\]: transform 'resize': max_size \(600\) must be greater than size \(800\)",
        ),
        (
            [{"name": "random_horizontal_flip", "args": {"p": 2}}],
            r"'p' = 2: Input should be less than or equal to 1",
        ),
        (
            [{"name": "random_crop", "args": {"min_size": 50, "max_size": 10}}],
            r"min_size \(50\) must not exceed max_size \(10\)",
        ),
        (
            [
                {
                    "name": "random_select",
                    "args": {"first": [{"name": "normalize"}], "second": [{"name": "zoom"}]},
                }
            ],
            r"data\.transforms\.train\[0\]\.args\.second\[0\]: unknown transform 'zoom'",
        ),
        ([{"name": "to_dtype", "args": {"dtype": "int8"}}], r"'dtype' = 'int8'"),
        (["resize"], r"\[0\]: a transform step must be a mapping"),
    ],
)
def test_config_errors_name_the_step(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_transforms(spec, where="data.transforms.train")


def test_empty_pipeline_is_identity():
    image, target = sample()
    out_image, out = build_transforms([])(image, target)
    assert torch.equal(out_image, image) and out["boxes"].tolist() == BOXES
