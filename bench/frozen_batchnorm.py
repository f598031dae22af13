"""The backbone's frozen BatchNorm, three ways, in a ResNet-50 body with DETR's trainable stages (layer2-4),
forward and forward+backward, interleaved in one process:

* torchvision: ``FrozenBatchNorm2d``, a scale and a shift, two passes over each feature map;
* one pass: ``FusedFrozenBatchNorm2d``, one ``F.batch_norm`` pass (forward and backward);
* folded: what the project's backbone runs, each convolution with its norm as one convolution
  (``detr.models.backbone.conv_norm``), no pass over the feature map at all.

    python bench/frozen_batchnorm.py [--size 512 --batch 2 --rounds 5 --channels-last]

Prints how far the outputs are apart, the best time of each and the ratios against torchvision's form
(above 1: faster than it).
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


def resnet50_backbone(norm_layer: type[nn.Module], channels_last: bool) -> Backbone:
    """The project's DETR backbone (ResNet-50, layer2-4 trainable) with its frozen BatchNorms computed as
    ``norm_layer``'s when they run unfolded (same buffers: only the forward differs)."""
    torch.manual_seed(0)
    backbone = Backbone("resnet50", num_levels=1, trainable_layers=3, frozen_batchnorm=True,
                        channels_last=channels_last)
    for norm in backbone.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            norm.__class__ = norm_layer
    return backbone


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true", help="the ResNet in channels-last memory")
    args = parser.parse_args()
    reference = resnet50_backbone(FrozenBatchNorm2d, args.channels_last)
    for norm in reference.modules():  # statistics of a trained network, not the identity
        if isinstance(norm, FrozenBatchNorm2d):
            norm.running_var.uniform_(0.5, 2.0), norm.running_mean.normal_()
            norm.weight.normal_(0.3, 0.1), norm.bias.normal_(0.0, 0.1)
    one_pass = resnet50_backbone(FusedFrozenBatchNorm2d, args.channels_last)
    one_pass.load_state_dict(reference.state_dict())
    images = torch.randn(args.batch, 3, args.size, args.size)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    forms = {  # name -> images -> layer4 features
        "torchvision": lambda x: reference.body(x)["0"],
        "one pass": lambda x: one_pass.body(x)["0"],
        "folded": lambda x: one_pass.stage_outputs(x)[0],
    }
    with torch.no_grad():
        outputs = {name: form(images) for name, form in forms.items()}
    scale = outputs["torchvision"].abs().max()
    apart = ", ".join(f"{name} {((out - outputs['torchvision']).abs().max() / scale):.1e}"
                      for name, out in outputs.items() if name != "torchvision")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-50 body, batch {args.batch} at "
          f"{args.size}x{args.size}{', channels-last' if args.channels_last else ''}; outputs apart from "
          f"torchvision's form by (relative to the largest): {apart}")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds + 1):  # round 0 warms up
        for name, form in forms.items():
            with torch.no_grad():
                times.setdefault(("forward", name), []).append(seconds(lambda: form(images)))
            times.setdefault(("forward+backward", name), []).append(seconds(lambda: form(images).sum().backward()))
    for kind in ("forward", "forward+backward"):
        best = {name: min(times[kind, name][1:]) for name in forms}
        cells = " | ".join(f"{name} {t:.3f} s ({best['torchvision'] / t:.2f}x)" for name, t in best.items())
        print(f"  {kind:17s} {cells}")


if __name__ == "__main__":
    main()
