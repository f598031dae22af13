"""The stride-2 3x3 convolutions whose weight gradient is split by input phase (``detr.models.strided_conv``):
the same values and gradients as a float64 convolution, and the split used exactly where it was measured
to pay."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detr.models import strided_conv
from detr.models.backbone import conv_norm


def _channels_last(*shape: int, generator: torch.Generator, grad: bool = True) -> torch.Tensor:
    tensor = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
    return tensor.requires_grad_(grad)


@pytest.mark.parametrize("height, width", [(256, 256), (257, 255), (259, 258)])
def test_split_gradients_equal_a_float64_convolution(height, width):
    """Even and odd extents (an odd one has no padded row of grad_output in its odd phase): the output
    and the input, weight and bias gradients against ``F.conv2d`` in float64."""
    generator = torch.Generator().manual_seed(height * width)
    x = _channels_last(1, 64, height, width, generator=generator)  # 16 MiB: split
    weight = _channels_last(8, 64, 3, 3, generator=generator)
    bias = torch.randn(8, generator=generator, requires_grad=True)
    out = strided_conv.conv2d(x, weight, bias, 2, 1, 1, 1)
    assert type(out.grad_fn).__name__ == "_PhaseSplitConvBackward"
    grad_output = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, (x, weight, bias), grad_output)

    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = F.conv2d(*exact, stride=2, padding=1)
    expected_grads = torch.autograd.grad(expected, exact, grad_output.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    for name, grad, reference in zip(("input", "weight", "bias"), grads, expected_grads):
        scale = reference.abs().max().item()
        torch.testing.assert_close(grad.double(), reference, rtol=1e-5, atol=1e-5 * scale, msg=name)
    # The weight gradient keeps the weight's layout, as oneDNN's does.
    assert grads[1].stride() == weight.stride()


def _uses_split(x_shape=(1, 64, 256, 256), *, stride=2, padding=1, kernel=3, dtype=torch.float32,
                channels_last=True, weight_grad=True, grad_mode=True, autocast=False) -> bool:
    x = torch.zeros(x_shape, dtype=dtype)
    weight = torch.zeros(8, x_shape[1], kernel, kernel, dtype=dtype, requires_grad=weight_grad)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(grad_mode), torch.autocast("cpu", enabled=autocast):
        return strided_conv.uses_phase_split(x, weight, stride, padding, 1, 1)


@pytest.mark.parametrize(("case", "expected"), [
    ({}, True),
    ({"x_shape": (2, 128, 200, 334)}, True),
    ({"x_shape": (4, 64, 128, 96)}, True),  # 12 MiB over the batch
    ({"x_shape": (4, 64, 128, 95)}, False),  # just below MIN_INPUT_BYTES
    ({"stride": 1}, False),
    ({"padding": 0}, False),
    ({"kernel": 1, "padding": 0}, False),
    ({"dtype": torch.float64}, False),
    ({"channels_last": False}, False),
    ({"weight_grad": False}, False),
    ({"grad_mode": False}, False),
    ({"autocast": True}, False),
])
def test_the_split_is_used_only_where_it_was_measured_to_pay(case, expected):
    assert _uses_split(**case) is expected


def test_the_backbones_folded_stride_2_conv_trains_through_the_split():
    """``conv_norm`` (the backbone's conv with its frozen BatchNorm folded in) routes a qualifying stride-2
    conv through the split; its input and weight gradients equal the float64 unfolded pair's."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 16, 3, stride=2, padding=1, bias=False).to(memory_format=torch.channels_last)
    norm = FrozenBatchNorm2d(16)
    for tensor in (norm.weight, norm.bias, norm.running_mean):
        tensor.copy_(torch.randn(16, generator=generator))
    norm.running_var.copy_(torch.rand(16, generator=generator) + 0.5)
    x = _channels_last(1, 64, 256, 256, generator=generator)
    out = conv_norm(x, conv, norm)
    assert type(out.grad_fn).__name__ == "_PhaseSplitConvBackward"
    grad_output = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, (x, conv.weight), grad_output)

    conv64, norm64 = copy.deepcopy(conv).double(), copy.deepcopy(norm).double()
    x64 = x.detach().double().requires_grad_()
    expected = norm64(conv64(x64))
    expected_grads = torch.autograd.grad(expected, (x64, conv64.weight), grad_output.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    for name, grad, reference in zip(("input", "weight"), grads, expected_grads):
        scale = reference.abs().max().item()
        torch.testing.assert_close(grad.double(), reference, rtol=1e-5, atol=1e-5 * scale, msg=name)
