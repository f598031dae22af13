"""Stride-2 3x3 convolutions whose weight gradient is computed one input phase at a time.

On CPU, oneDNN (torch 2.14) computes the weight gradient of a stride-2 3x3 convolution in channels-last
memory at a fraction of its stride-1 rate once the input is large: ResNet-50's layer2 at 512x512
(batch 2, a [2, 128, 128, 128] input, 16 MiB) takes 41-47 ms, 51-59 GFLOP/s, a third of the rate of
a stride-1 3x3 convolution's weight gradient. The same gradient is a sum over the four phases of the
input (even or odd rows, even or odd columns), each a stride-1 convolution's weight gradient with a
1- or 2-tap kernel, which oneDNN runs at its full rate: 19.5-24 ms there. On inputs of 8 MiB and less
the two forms take the same time and on small ones the four calls cost more, so the split is used
from 12 MiB of input (``uses_phase_split``); ``bench/strided_conv.py`` prints both forms for every
stride-2 3x3 shape of the ResNets here, and bench/README.md the table behind the threshold.

The forward and the input gradient are oneDNN's own. The weight gradient sums the same products in
another order, so it equals oneDNN's to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from detr.models import inplace

# Where the split pays (bench/README.md, `strided_conv.py`): from this many bytes of input, batch included.
MIN_INPUT_BYTES = 12 * 2**20


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
           groups: int) -> torch.Tensor:
    """``F.conv2d`` with the same arguments; a stride-2 3x3 convolution that ``uses_phase_split`` gets its
    weight gradient phase by phase. x [B, C_in, H, W], weight [C_out, C_in / groups, k, k]."""
    if uses_phase_split(x, weight, stride, padding, dilation, groups):
        return _PhaseSplitConv.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def uses_phase_split(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """A float32 channels-last CPU stride-2 3x3 convolution (padding 1, no dilation or groups) whose weight
    trains and whose input x [B, C_in, H, W] holds at least ``MIN_INPUT_BYTES``; outside autocast, tracing
    and compilation (they record ``F.conv2d`` itself)."""
    if not inplace.recorded(weight) or x.dim() != 4:
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if (_pair(stride), _pair(padding), _pair(dilation), groups) != ((2, 2), (1, 1), (1, 1), 1):
        return False
    if tuple(weight.shape[-2:]) != (3, 3) or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return x.numel() * x.element_size() >= MIN_INPUT_BYTES


class _PhaseSplitConv(torch.autograd.Function):
    """conv2d(x, weight, bias, stride=2, padding=1) with the weight gradient of ``phase_split_weight_grad``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, 2, 1)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, (2, 2), (1, 1), (1, 1), False, (0, 0), 1, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_weight = phase_split_weight_grad(grad_output, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias


def phase_split_weight_grad(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weight gradient [C_out, C_in, 3, 3] of conv2d(x, weight, stride=2, padding=1), as four stride-1 ones.

    Along each axis, output o reads input rows 2o - 1, 2o, 2o + 1 with taps 0, 1, 2. The even rows
    x[0::2] meet only tap 1, a 1-tap stride-1 convolution with Ho outputs. The odd rows x[1::2] meet tap 0
    (row o - 1 of them) and tap 2 (row o): a 2-tap stride-1 convolution with padding 1, whose output has
    H // 2 + 1 rows, one more than Ho when H is even; that row's gradient is zero (grad_output padded).
    grad_output [B, C_out, Ho, Wo] and x [B, C_in, H, W], both channels-last; only the weight's shape and
    layout are used (the gradient takes them).
    """
    out_channels, in_channels = weight.shape[:2]
    height, width = x.shape[2:]
    out_h, out_w = grad_output.shape[2:]
    grad_weight = torch.empty_like(weight)
    # Per axis: (first input row, the taps it meets, how many, rows of zero padding at grad_output's end).
    phases_h = ((0, slice(1, 2), 1, 0), (1, slice(0, 3, 2), 2, height // 2 + 1 - out_h))
    phases_w = ((0, slice(1, 2), 1, 0), (1, slice(0, 3, 2), 2, width // 2 + 1 - out_w))
    for start_h, taps_h, kernel_h, pad_h in phases_h:
        for start_w, taps_w, kernel_w, pad_w in phases_w:
            phase = x[:, :, start_h::2, start_w::2].contiguous(memory_format=torch.channels_last)
            grad = grad_output
            if pad_h or pad_w:
                grad = F.pad(grad_output, (0, pad_w, 0, pad_h)).contiguous(memory_format=torch.channels_last)
            # Only the weight's shape and layout matter for its gradient.
            like = torch.empty((out_channels, in_channels, kernel_h, kernel_w), dtype=x.dtype, device=x.device,
                               memory_format=torch.channels_last)
            grad_weight[:, :, taps_h, taps_w] = torch.ops.aten.convolution_backward(
                grad, phase, like, None, (1, 1), (kernel_h - 1, kernel_w - 1), (1, 1), False, (0, 0), 1,
                (False, True, False))[1]  # [C_out, C_in, kernel_h, kernel_w]
    return grad_weight
