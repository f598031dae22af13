"""The whole model on CUDA against the same model on the CPU: outputs and gradients of every variant.

Skipped without a GPU. With the parameters in float64 the devices differ by rounding only: a wrong
index, a missed mask or a race in a CUDA kernel shows up as a difference orders larger. Some tensors
stay float32 in a float64 model (the sine position encodings, the resized padding masks), so the
tolerances are float32's: measured on an H200 (2026-12-04), the logits differed by at most 7.6e-9
(3.3e-7 relative) and the loss by 9e-8 relative. In float32 (TF32 off; cuDNN uses it for convolutions
by default) the outputs agree to 1e-4. Float32 gradients are not compared: cuDNN's convolution
backward differed from the CPU's by up to 7e-3 of the first layer's largest gradient on the H200, a
property of cuDNN's algorithms rather than of this code.
"""

from __future__ import annotations

import copy

import pytest
import torch

from detr.models.build import build_criterion, build_model
from detr.models.inputs import pad_images

from .conftest import VARIANTS, random_targets, tiny_model_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different sizes, padded into one batch: [2, 3, H, W] and the padding mask [2, H, W]."""
    g = torch.Generator().manual_seed(0)
    return pad_images([torch.randn(3, 96, 128, generator=g), torch.randn(3, 112, 80, generator=g)])


def _run(model, criterion, images, masks, targets, device, dtype=torch.float32):
    model = copy.deepcopy(model).to(device, dtype)
    criterion = copy.deepcopy(criterion).to(device, dtype)
    targets = [{k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in t.items()}
               for t in targets]
    outputs = model(images.to(device, dtype), masks.to(device))
    terms = criterion(outputs, targets)
    loss = terms["weighted_total"]
    loss.backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return outputs["pred_logits"].detach().cpu(), outputs["pred_boxes"].detach().cpu(), loss.item(), grads


def _build(variant: str):
    torch.manual_seed(0)
    config = tiny_model_config(variant)
    return build_model(config, NUM_CLASSES).train(), build_criterion(config, NUM_CLASSES)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_on_cuda_matches_cpu_float64(variant):
    model, criterion = _build(variant)
    images, masks = _batch()
    targets = random_targets([3, 2], NUM_CLASSES, seed=1)

    logits_cpu, boxes_cpu, loss_cpu, grads_cpu = _run(model, criterion, images, masks, targets, "cpu", torch.float64)
    logits_gpu, boxes_gpu, loss_gpu, grads_gpu = _run(model, criterion, images, masks, targets, "cuda", torch.float64)

    torch.testing.assert_close(logits_gpu, logits_cpu, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(boxes_gpu, boxes_cpu, rtol=1e-5, atol=1e-7)
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-6)
    assert grads_gpu.keys() == grads_cpu.keys()
    worst = {}
    for name, grad in grads_cpu.items():
        # Relative to the tensor's largest entry: a gradient of 1e-12 next to one of 1 is rounding noise.
        error = (grads_gpu[name] - grad).abs().max().item() / max(grad.abs().max().item(), 1e-12)
        if error > 1e-4:
            worst[name] = error
    assert not worst, f"gradients that differ beyond rounding: {worst}"


@pytest.mark.parametrize("variant", ["detr", "deformable_two_stage"])
def test_model_on_cuda_matches_cpu_float32_outputs(variant):
    model, criterion = _build(variant)
    images, masks = _batch()
    targets = random_targets([3, 2], NUM_CLASSES, seed=1)

    logits_cpu, boxes_cpu, loss_cpu, _ = _run(model, criterion, images, masks, targets, "cpu")
    logits_gpu, boxes_gpu, loss_gpu, _ = _run(model, criterion, images, masks, targets, "cuda")

    torch.testing.assert_close(logits_gpu, logits_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxes_gpu, boxes_cpu, rtol=1e-4, atol=1e-5)
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-4)
