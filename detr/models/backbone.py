"""ResNet backbone: torchvision ResNet body, frozen BatchNorm folded into its convolutions, multi-level features
with their masks.

Weights are never downloaded: the ResNet is built with ``weights=None`` and, when a path is given,
a local torchvision ResNet state dict is loaded from it. Module names follow the official DETR code
(``backbone.0.body.layer1...``, ``backbone.1`` = position encoding) so converted checkpoints map
key for key.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from detr.errors import CheckpointError
from detr.models import strided_conv

# Width of layer2, layer3, layer4 before a block's expansion (x1 BasicBlock, x4 Bottleneck).
_STAGE_WIDTHS = (128, 256, 512)
_OUTPUT_STAGES = ("layer2", "layer3", "layer4")  # strides 8, 16, 32
# Trainable stages counted from the top; "conv1" includes its BatchNorm "bn1".
_STAGES_TOP_DOWN = (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (same buffers, same state-dict keys, same result up to float32
    rounding) computed by ``F.batch_norm`` in inference mode: one fused pass over the feature map
    instead of torchvision's scale and shift as two, and one in the backward. A ResNet-50 has 53 of
    them; ``bench/frozen_batchnorm.py`` measures the gain. Under autocast the result keeps the input's
    dtype (torchvision's promotes bfloat16 features to float32 for the next convolution to cast back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def conv_norm(x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module) -> torch.Tensor:
    """``norm(conv(x))`` as one convolution when the norm is an affine map, i.e. a frozen BatchNorm or
    one in eval mode: y = (W * x + b - mean) * s + beta with s = gamma / sqrt(var + eps) is the
    convolution with weight s * W and bias (b - mean) * s + beta. The norm's passes over the feature
    map, forward and backward, are gone; the fold is a pass over the weight. Without gradients for the
    weights (inference, frozen stages) the folded pair is computed once and kept (``_folded``), so
    folding always pays. A weight that trains is folded anew in every step, forward and backward, so
    it is folded only when its output map has at least as many elements as the weight (ResNet-50's
    layer4 at 128 pixels has 1/16 of that: there the norm's passes are cheaper). Gradients reach W
    (and gamma, beta of a plain BatchNorm) through the fold; the result equals the two-step one to
    rounding. A BatchNorm in training mode normalizes by the batch's own statistics: never folded.

    x [B, C_in, H, W] -> [B, C_out, H', W'], in x's memory format (the weight's, when channels-last).
    """
    if isinstance(norm, nn.BatchNorm2d) and (norm.training or norm.running_var is None):
        return norm(_conv(x, conv, conv.weight, conv.bias))
    if not isinstance(norm, (nn.BatchNorm2d, FrozenBatchNorm2d)):
        raise TypeError(f"conv_norm folds BatchNorm2d or FrozenBatchNorm2d, got {type(norm).__name__}")
    tensors = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    trains = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if trains and _output_elements(x, conv) < conv.weight.numel():
        return norm(_conv(x, conv, conv.weight, conv.bias))
    weight, bias = _folded(conv, norm, tensors, keep=not trains)
    return _conv(x, conv, weight, bias)


def _conv(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s convolution with the given weight and bias (``strided_conv`` for its stride-2 weight gradient)."""
    return strided_conv.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _output_elements(x: torch.Tensor, conv: nn.Conv2d) -> int:
    """Elements of conv(x): B * C_out * H' * W'."""
    size = x.shape[0] * conv.out_channels
    for extent, kernel, stride, padding, dilation in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.padding,
                                                         conv.dilation):
        size *= (extent + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return size


def _folded(conv: nn.Conv2d, norm: nn.Module, tensors: tuple, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded weight [C_out, C_in, k, k] and bias [C_out]. With ``keep`` (nothing to differentiate)
    the pair is kept on the norm and reused until a tensor it came from is replaced or changed in place
    (its version counter), so a served model folds once: in ResNet-50 the fold is about 30 ms per call
    on two CPU cores against 250 ms for a 512x512 image. Otherwise it is recomputed, so that gradients
    flow through it; tracing (ONNX export) records the fold itself."""
    keep = keep and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
    if keep:
        key = (torch.is_inference_mode_enabled(),) + tuple(
            None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        cached = norm.__dict__.get("_folded_conv")
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)  # [C_out]
    bias = norm.bias - norm.running_mean * scale  # [C_out]
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale[:, None, None, None]
    if keep:
        norm.__dict__["_folded_conv"] = (key, weight, bias)  # not a buffer: never in the state dict
    return weight, bias


class FoldedBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` (same modules and state-dict keys) with each conv and its norm run as
    one convolution (``conv_norm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else conv_norm(x, self.downsample[0], self.downsample[1])
        out = self.relu(conv_norm(x, self.conv1, self.bn1))
        out = conv_norm(out, self.conv2, self.bn2)
        out += identity
        return self.relu(out)


class FoldedBottleneck(Bottleneck):
    """torchvision's ``Bottleneck`` (same modules and state-dict keys) with each conv and its norm run as
    one convolution (``conv_norm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else conv_norm(x, self.downsample[0], self.downsample[1])
        out = self.relu(conv_norm(x, self.conv1, self.bn1))
        out = self.relu(conv_norm(out, self.conv2, self.bn2))
        out = conv_norm(out, self.conv3, self.bn3)
        out += identity
        return self.relu(out)


class Backbone(nn.Module):
    """A torchvision ResNet returning the last ``num_levels`` of (layer2, layer3, layer4).

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101, or resnet10: ResNet-18's stages with one
            BasicBlock each instead of two (half its convolutions; for CPUs, trained from scratch).
        num_levels: 1 (layer4 only, DETR) to 3 (layer2..4, Deformable DETR multi-scale).
        trainable_layers: stages that train, counted from the top (0: none, 3: layer2..4 as DETR,
            5: all including conv1). The others get ``requires_grad=False``.
        dilation: replace layer4's stride by a dilation (DETR-DC5): stride 16 instead of 32, the same
            weights. torchvision dilates Bottleneck ResNets; BasicBlock ones (resnet18/34) are dilated
            here the same way (``_dilate_basic_layer4``).
        frozen_batchnorm: use ``FrozenBatchNorm2d`` (statistics and affine fixed, as the papers);
            with plain BatchNorm, the BatchNorms of frozen stages still stay in eval mode.
        weights: a local torchvision ResNet state dict (``fc.*`` keys are ignored), or None.
        channels_last: run the ResNet in channels-last (NHWC) memory format: its weights are stored
            so and the images converted on entry. The same function to float32 rounding; oneDNN's
            CPU convolutions (bf16 autocast above all) and cuDNN's tensor-core ones are faster in it.
            The returned features are channels-last too (every later op accepts either layout).

    Attributes:
        strides: stride of each returned level, e.g. [8, 16, 32].
        num_channels: channels of each returned level, e.g. [512, 1024, 2048].
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        num_levels: int = 1,
        trainable_layers: int = 3,
        dilation: bool = False,
        frozen_batchnorm: bool = True,
        weights: Path | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if name not in RESNET_NAMES:
            raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(RESNET_NAMES)}")
        if not 1 <= num_levels <= len(_OUTPUT_STAGES):
            raise ValueError(f"num_levels must be 1..{len(_OUTPUT_STAGES)}, got {num_levels}")
        if not 0 <= trainable_layers <= len(_STAGES_TOP_DOWN):
            raise ValueError(f"trainable_layers must be 0..{len(_STAGES_TOP_DOWN)}, got {trainable_layers}")
        norm_layer = FusedFrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
        basic_block = name in ("resnet10", "resnet18", "resnet34")
        resnet = _resnet(name, replace_stride_with_dilation=[False, False, dilation and not basic_block],
                         norm_layer=norm_layer)
        if dilation and basic_block:
            _dilate_basic_layer4(resnet.layer4)
        if weights is not None:
            load_resnet_state_dict(resnet, Path(weights))
        self.trainable_prefixes = tuple(p for stage in _STAGES_TOP_DOWN[:trainable_layers] for p in stage)
        for param_name, param in resnet.named_parameters():
            if not param_name.startswith(self.trainable_prefixes):
                param.requires_grad_(False)
        self.channels_last = channels_last
        if channels_last:
            # The weights keep this layout through load_state_dict (it copies into them) and .to(device).
            resnet.to(memory_format=torch.channels_last)
        stages = _OUTPUT_STAGES[len(_OUTPUT_STAGES) - num_levels :]
        self.body = IntermediateLayerGetter(resnet, return_layers={stage: str(i) for i, stage in enumerate(stages)})
        all_strides = (8, 16, 16 if dilation else 32)
        all_channels = [width * RESNET_LAYOUTS[name][0].expansion for width in _STAGE_WIDTHS]
        self.strides = [all_strides[_OUTPUT_STAGES.index(s)] for s in stages]
        self.num_channels = [all_channels[_OUTPUT_STAGES.index(s)] for s in stages]

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        # A frozen stage keeps its running statistics even when BatchNorm is not the frozen kind.
        for module_name, module in self.body.named_modules():
            if isinstance(module, nn.BatchNorm2d) and not module_name.startswith(self.trainable_prefixes):
                module.eval()
        return self

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images [B, 3, H, W], mask [B, H, W] (True = padding) -> per level (feature [B, C_l, H_l, W_l],
        mask [B, H_l, W_l]); the mask is downsampled by nearest-neighbour interpolation."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out = []
        for feature in self.stage_outputs(images):
            level_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
            out.append((feature, level_mask))
        return out

    def stage_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """What ``self.body(images)`` returns, with the stem's conv1 and bn1 folded into one convolution."""
        x, features = images, []
        for module_name, module in self.body.items():
            if module_name == "bn1":
                continue  # folded into conv1
            x = conv_norm(x, module, self.body.bn1) if module_name == "conv1" else module(x)
            if module_name in self.body.return_layers:
                features.append(x)
        return features


# Block type and blocks per stage (layer1..layer4) of torchvision's ResNets (resnet10: ResNet-18 with one
# block per stage, not one of its presets). The checkpoint converters recognize a backbone by them.
RESNET_LAYOUTS = {
    "resnet10": (FoldedBasicBlock, [1, 1, 1, 1]),
    "resnet18": (FoldedBasicBlock, [2, 2, 2, 2]),
    "resnet34": (FoldedBasicBlock, [3, 4, 6, 3]),
    "resnet50": (FoldedBottleneck, [3, 4, 6, 3]),
    "resnet101": (FoldedBottleneck, [3, 4, 23, 3]),
}
RESNET_NAMES = tuple(RESNET_LAYOUTS)


def _resnet(name: str, **kwargs) -> torchvision.models.ResNet:
    """torchvision's ResNet class with random weights (never downloaded) and blocks that fold their
    norms into their convolutions: the modules and keys of ``torchvision.models.<name>``."""
    block, layers = RESNET_LAYOUTS[name]
    return torchvision.models.ResNet(block, layers, **kwargs)


def _dilate_basic_layer4(layer4: nn.Sequential) -> None:
    """Trade layer4's stride 2 for dilation 2 in a BasicBlock ResNet, as torchvision's
    ``replace_stride_with_dilation`` does for Bottleneck ones (torchvision refuses it for BasicBlock).

    The first block's strided 3x3 conv and its 1x1 shortcut keep their weights at stride 1; every 3x3
    conv after it sees a map twice as fine, so it samples every second pixel (dilation 2, padding 2).
    In eval mode the result at even positions is exactly the strided network's output.
    """
    first = layer4[0]
    first.conv1.stride = (1, 1)
    first.downsample[0].stride = (1, 1)
    for index, block in enumerate(layer4):
        for conv in (block.conv2,) if index == 0 else (block.conv1, block.conv2):
            conv.dilation, conv.padding = (2, 2), (2, 2)


class Joiner(nn.Sequential):
    """Backbone (index 0) plus position encoding (index 1), as the official ``Joiner``."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """-> features [B, C_l, H_l, W_l], masks [B, H_l, W_l], position encodings [B, D, H_l, W_l]."""
        features, masks, pos = [], [], []
        for feature, level_mask in self[0](images, mask):
            features.append(feature)
            masks.append(level_mask)
            pos.append(self[1](feature, level_mask).to(feature.dtype))
        return features, masks, pos


def load_resnet_state_dict(resnet: nn.Module, path: Path) -> None:
    """Load a local torchvision ResNet state dict into ``resnet``; any mismatch is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"backbone weights file {path} not found (model.backbone.weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"backbone weights file {path}: cannot read it as a state dict ({e})") from None
    if isinstance(state, Mapping) and not _all_tensors(state):
        inner = state.get("state_dict", state.get("model"))
        if isinstance(inner, Mapping):
            state = inner
    if not isinstance(state, Mapping) or not _all_tensors(state):
        raise CheckpointError(
            f"backbone weights file {path}: expected a torchvision ResNet state dict (name -> tensor), "
            f"got {type(state).__name__}"
        )
    # The classifier (fc) is not part of the backbone and keeps its random initialisation.
    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    # FrozenBatchNorm2d has no num_batches_tracked.
    given = {
        k: v
        for k, v in state.items()
        if not k.startswith("fc.") and not (k.endswith("num_batches_tracked") and k not in expected)
    }
    for key in expected:  # a counter only, absent from older torchvision checkpoints
        if key.endswith("num_batches_tracked") and key not in given:
            given[key] = expected[key]
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"backbone weights file {path} does not fit a torchvision {type(resnet).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]} "
            f"(is it the state dict of the configured model.backbone.name?)"
        )
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in given.items() if v.shape != expected[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(
            f"backbone weights file {path}: {len(wrong)} tensors have the wrong shape, e.g. {key} is {got}, "
            f"the model needs {want} (is it the state dict of the configured model.backbone.name?)"
        )
    resnet.load_state_dict(given, strict=False)  # all keys but fc.* checked above


def _all_tensors(state: Mapping) -> bool:
    return len(state) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
