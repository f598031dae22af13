"""Joint image/box transform pipelines built from the config's list of steps.

A pipeline is ``(image, target) -> (image, target)``: ``image`` a ``tv_tensors.Image`` [3, H, W]
(uint8 or float), ``target`` a dict with ``"boxes"`` (``tv_tensors.BoundingBoxes``, XYXY pixels,
``canvas_size=(H, W)``), ``"labels"`` int64 [N] and optional per-box attributes (``iscrowd``,
``difficult``, ``occluded``, ``truncated``: [N] tensors). torchvision.transforms.v2 moves the boxes
with the image; steps that can remove boxes (``random_crop``) sanitize the labels and every per-box
attribute together with the boxes. Boxes stay xyxy pixels here: the change to normalized cxcywh is
``detr.data.targets.to_model_targets``, called by the loader after the pipeline.

Steps (``data.transforms.train`` / ``.val`` in the config, ``{name: ..., args: {...}}``):

=========================  ===================================================================
``resize``                 ``size``, ``max_size``: shorter side to ``size``, longer side capped
``random_resize``          ``sizes``, ``max_size``: like resize with a size drawn from ``sizes``
``random_horizontal_flip`` ``p``
``random_crop``            ``min_size``, ``max_size``: DETR's random size crop; boxes are clipped
                           and boxes left with no area are removed (the loader counts them)
``random_select``          ``first``, ``second`` (lists of steps), ``p``: run ``first`` with
                           probability ``p``, else ``second`` (DETR's RandomSelect)
``color_jitter``           ``brightness``, ``contrast``, ``saturation``, ``hue``, ``p``
``photometric``            SSD-style photometric distortion: the same four ranges, ``p``
``normalize``              ``mean``, ``std`` (ImageNet by default); converts uint8 to float first
``to_dtype``               ``dtype`` (float32|float16|bfloat16|float64), ``scale``
=========================  ===================================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationError, model_validator
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detr.config import Section, TransformsSpec, TransformStep
from detr.data.records import ATTRIBUTE_DTYPES
from detr.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Target keys holding one value per box: they are filtered together with the boxes.
PER_BOX_KEYS: tuple[str, ...] = ("labels", *ATTRIBUTE_DTYPES)

Target = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# step arguments (validated; unknown arguments are errors)
# ---------------------------------------------------------------------------------------------

PositiveInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
FactorRange = tuple[NonNegFloat, NonNegFloat]
HueRange = tuple[Annotated[float, Field(ge=-0.5, le=0.5)], Annotated[float, Field(ge=-0.5, le=0.5)]]


class ResizeArgs(Section):
    size: PositiveInt
    max_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _cap_above_size(self) -> ResizeArgs:
        if self.max_size is not None and self.max_size <= self.size:
            raise ValueError(f"max_size ({self.max_size}) must be greater than size ({self.size})")
        return self


class RandomResizeArgs(Section):
    sizes: list[PositiveInt] = Field(min_length=1)
    max_size: PositiveInt | None = None


class FlipArgs(Section):
    p: Probability = 0.5


class RandomCropArgs(Section):
    min_size: PositiveInt
    max_size: PositiveInt

    @model_validator(mode="after")
    def _ordered(self) -> RandomCropArgs:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        return self


class RandomSelectArgs(Section):
    first: list[TransformStep] = Field(min_length=1)
    second: list[TransformStep] = Field(min_length=1)
    p: Probability = 0.5


class ColorJitterArgs(Section):
    # A number f means the factor range [max(0, 1 - f), 1 + f] (hue: [-f, f]), as in torchvision.
    brightness: NonNegFloat | FactorRange = 0.0
    contrast: NonNegFloat | FactorRange = 0.0
    saturation: NonNegFloat | FactorRange = 0.0
    hue: Annotated[float, Field(ge=0, le=0.5)] | HueRange = 0.0
    p: Probability = 1.0


class PhotometricArgs(Section):
    brightness: FactorRange = (0.875, 1.125)
    contrast: FactorRange = (0.5, 1.5)
    saturation: FactorRange = (0.5, 1.5)
    hue: HueRange = (-0.05, 0.05)
    p: Probability = 0.5


class NormalizeArgs(Section):
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[
        Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]
    ] = IMAGENET_STD


class ToDtypeArgs(Section):
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    scale: bool = True


# ---------------------------------------------------------------------------------------------
# transforms torchvision does not have as such
# ---------------------------------------------------------------------------------------------


class RandomSizeCrop(v2.Transform):
    """DETR's RandomSizeCrop: a crop of random width and height in [min_size, max_size].

    Sides are capped by the image (an image smaller than ``min_size`` is kept whole on that side).
    Boxes are clipped by ``F.crop``; follow with ``SanitizeBoundingBoxes`` to remove those left
    without area. Randomness comes from torch's generator, so ``torch.manual_seed`` fixes it.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = _randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = _randint(min(self.min_size, height), min(height, self.max_size))
        top = _randint(0, height - crop_h)
        left = _randint(0, width - crop_w)
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class ShorterSideResize(v2.Transform):
    """torchvision's ``Resize(size, max_size)`` rule, with every side at least one pixel.

    The shorter side goes to ``size``; when the longer side would then pass ``max_size``, the
    longer side goes to ``max_size`` instead. torchvision rounds the shorter side down, so a strip
    (1x1000 with max_size 128: 128 * 1 / 1000 = 0.128) became 0 pixels wide and the model failed
    on it. Here it stays 1 pixel; every other size comes out exactly as torchvision's.
    """

    def __init__(self, size: int, max_size: int | None = None) -> None:
        super().__init__()
        self.size = size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        new_short = max(new_short, 1)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        return {"size": [new_h, new_w]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomShortestSizeAtLeastOne(v2.RandomShortestSize):
    """``RandomShortestSize`` with every side at least one pixel (see ``ShorterSideResize``)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = super().make_params(flat_inputs)["size"]
        return {"size": (max(height, 1), max(width, 1))}


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, ()))


def _per_box_tensors(inputs: Any) -> tuple[torch.Tensor, ...]:
    """For SanitizeBoundingBoxes: every per-box tensor of the target, filtered with the boxes."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(value for key, value in target.items() if key in PER_BOX_KEYS)


def _sanitize() -> v2.Transform:
    return v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_per_box_tensors)


# ---------------------------------------------------------------------------------------------
# step builders
# ---------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _build_resize(a: ResizeArgs, where: str) -> v2.Transform:
    return ShorterSideResize(a.size, max_size=a.max_size)


def _build_random_resize(a: RandomResizeArgs, where: str) -> v2.Transform:
    return RandomShortestSizeAtLeastOne(min_size=a.sizes, max_size=a.max_size, antialias=True)


def _build_flip(a: FlipArgs, where: str) -> v2.Transform:
    return v2.RandomHorizontalFlip(p=a.p)


def _build_random_crop(a: RandomCropArgs, where: str) -> v2.Transform:
    return v2.Compose([RandomSizeCrop(a.min_size, a.max_size), _sanitize()])


def _build_random_select(a: RandomSelectArgs, where: str) -> v2.Transform:
    first = _compose(a.first, f"{where}.args.first")
    second = _compose(a.second, f"{where}.args.second")
    return v2.RandomChoice([first, second], p=[a.p, 1.0 - a.p])


def _build_color_jitter(a: ColorJitterArgs, where: str) -> v2.Transform:
    jitter = v2.ColorJitter(brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue)
    return jitter if a.p == 1.0 else v2.RandomApply([jitter], p=a.p)


def _build_photometric(a: PhotometricArgs, where: str) -> v2.Transform:
    return v2.RandomPhotometricDistort(
        brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue, p=a.p
    )


def _build_normalize(a: NormalizeArgs, where: str) -> v2.Transform:
    # Normalize needs float pixels in [0, 1]; ToDtype leaves an image that is already float32 as is.
    return v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(a.mean), std=list(a.std))]
    )


def _build_to_dtype(a: ToDtypeArgs, where: str) -> v2.Transform:
    return v2.ToDtype(_DTYPES[a.dtype], scale=a.scale)  # a plain dtype converts images only, not boxes


STEPS: dict[str, tuple[type[Section], Callable[[Any, str], v2.Transform]]] = {
    "resize": (ResizeArgs, _build_resize),
    "random_resize": (RandomResizeArgs, _build_random_resize),
    "random_horizontal_flip": (FlipArgs, _build_flip),
    "random_crop": (RandomCropArgs, _build_random_crop),
    "random_select": (RandomSelectArgs, _build_random_select),
    "color_jitter": (ColorJitterArgs, _build_color_jitter),
    "photometric": (PhotometricArgs, _build_photometric),
    "normalize": (NormalizeArgs, _build_normalize),
    "to_dtype": (ToDtypeArgs, _build_to_dtype),
}


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------


class DetectionTransforms:
    """A built pipeline: ``(image, target) -> (image, target)``; ``steps`` is what it was built from."""

    def __init__(self, transform: v2.Transform, steps: tuple[TransformStep, ...]) -> None:
        self.transform = transform
        self.steps = steps

    def __call__(self, image: tv_tensors.Image, target: Target) -> tuple[tv_tensors.Image, Target]:
        return self.transform(image, target)

    def __repr__(self) -> str:
        names = ", ".join(step.name for step in self.steps)
        return f"DetectionTransforms([{names}])"


def build_transforms(
    steps: Sequence[TransformStep | Mapping[str, Any]], *, where: str = "data.transforms"
) -> DetectionTransforms:
    """Build a pipeline from config steps. ``where`` (e.g. ``data.transforms.train``) prefixes errors."""
    parsed = tuple(_as_step(step, f"{where}[{i}]") for i, step in enumerate(steps))
    return DetectionTransforms(_compose(parsed, where), parsed)


def build_split_transforms(spec: TransformsSpec, split: Literal["train", "val"]) -> DetectionTransforms:
    """The pipeline of ``data.transforms.<split>``."""
    return build_transforms(getattr(spec, split), where=f"data.transforms.{split}")


def _compose(steps: Sequence[TransformStep | Mapping[str, Any]], where: str) -> v2.Transform:
    transforms = [
        _build_step(_as_step(step, f"{where}[{i}]"), f"{where}[{i}]") for i, step in enumerate(steps)
    ]
    if not transforms:
        return v2.Identity()
    return transforms[0] if len(transforms) == 1 else v2.Compose(transforms)


def _as_step(step: TransformStep | Mapping[str, Any], where: str) -> TransformStep:
    if isinstance(step, TransformStep):
        return step
    if not isinstance(step, Mapping):
        raise ConfigError(
            f"{where}: a transform step must be a mapping {{name: ..., args: {{...}}}}, got {step!r}"
        )
    try:
        return TransformStep.model_validate(dict(step))
    except ValidationError as e:
        problems = "; ".join(f"'{'.'.join(map(str, err['loc']))}': {err['msg']}" for err in e.errors())
        raise ConfigError(
            f"{where}: invalid transform step {dict(step)!r} ({problems}); expected keys: name, args"
        ) from None


def _build_step(step: TransformStep, where: str) -> v2.Transform:
    entry = STEPS.get(step.name)
    if entry is None:
        close = difflib.get_close_matches(step.name, STEPS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: unknown transform '{step.name}'{hint}; accepted: {', '.join(STEPS)}")
    args_model, builder = entry
    try:
        args = args_model.model_validate(step.args)
    except ValidationError as e:
        raise ConfigError(_describe_args_error(e, step.name, args_model, where)) from None
    return builder(args, where)


def _describe_args_error(error: ValidationError, name: str, model: type[Section], where: str) -> str:
    accepted = ", ".join(model.model_fields) or "none"
    problems = []
    seen: set[str] = set()
    for item in error.errors():
        # loc[0] is the argument; deeper parts name union members or list items, which would only
        # repeat the same problem once per alternative, so report the first one per argument.
        arg = str(item["loc"][0]) if item["loc"] else ""
        if arg in seen:
            continue
        seen.add(arg)
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown argument '{arg}'")
        elif item["type"] == "missing":
            problems.append(f"missing argument '{arg}'")
        elif not arg:  # a check across arguments (model validator)
            problems.append(item["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"'{arg}' = {item.get('input')!r}: {item['msg']}")
    return f"{where}: transform '{name}': {'; '.join(problems)}; accepted arguments: {accepted}"
