"""The backbone's frozen BatchNorm: torchvision's ``FrozenBatchNorm2d`` (scale and shift, two passes over
each feature map) against ``FusedFrozenBatchNorm2d`` (one ``F.batch_norm`` pass), in a ResNet-50 body
with DETR's trainable stages (layer2-4), forward and forward+backward, interleaved in one process.

    python bench/frozen_batchnorm.py [--size 512 --batch 2 --rounds 5]

Prints the relative difference of the outputs, the best time of each and the ratio torchvision / fused
(above 1: the fused form is faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detr.models.backbone import Backbone, FusedFrozenBatchNorm2d  # noqa: E402


def resnet50_body(norm_layer: type[nn.Module]) -> nn.Module:
    """The project's DETR backbone body (ResNet-50, layer2-4 trainable) with its frozen BatchNorms
    computed as ``norm_layer``'s (same buffers: only the forward differs)."""
    torch.manual_seed(0)
    body = Backbone("resnet50", num_levels=1, trainable_layers=3, frozen_batchnorm=True).body
    for norm in body.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            norm.__class__ = norm_layer
    return body


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    reference, fused = resnet50_body(FrozenBatchNorm2d), resnet50_body(FusedFrozenBatchNorm2d)
    for norm in reference.modules():  # statistics of a trained network, not the identity
        if isinstance(norm, FrozenBatchNorm2d):
            norm.running_var.uniform_(0.5, 2.0), norm.running_mean.normal_()
            norm.weight.normal_(0.3, 0.1), norm.bias.normal_(0.0, 0.1)
    fused.load_state_dict(reference.state_dict())
    images = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        expected, got = reference(images)["0"], fused(images)["0"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-50 body, batch {args.batch} at "
          f"{args.size}x{args.size}; outputs differ by {((got - expected).abs().max() / expected.abs().max()):.1e} "
          "(relative to the largest)")
    times: dict[str, list[float]] = {"forward": [], "forward fused": [], "train": [], "train fused": []}
    for _ in range(args.rounds + 1):  # round 0 warms up
        with torch.no_grad():
            times["forward"].append(seconds(lambda: reference(images)))
            times["forward fused"].append(seconds(lambda: fused(images)))
        times["train"].append(seconds(lambda: reference(images)["0"].sum().backward()))
        times["train fused"].append(seconds(lambda: fused(images)["0"].sum().backward()))
    best = {k: min(v[1:]) for k, v in times.items()}
    for kind in ("forward", "train"):
        label = "forward" if kind == "forward" else "forward+backward"
        print(f"  {label:17s} torchvision {best[kind]:.3f} s | fused {best[kind + ' fused']:.3f} s "
              f"({best[kind] / best[kind + ' fused']:.2f}x)")


if __name__ == "__main__":
    main()
