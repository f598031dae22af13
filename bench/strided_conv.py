"""The weight gradient of the ResNets' stride-2 3x3 convolutions in channels-last memory: oneDNN's against the
phase split of ``detr.models.strided_conv`` (four stride-1 weight gradients), interleaved in one process.

For each stride-2 3x3 convolution of ResNet-50 (layer2-4, the first block's conv2) and ResNet-18 (the first
block's conv1) at the given image sizes, it prints the shapes, the best time of each form, the ratio
(above 1: the split is faster), how far the two gradients are apart (relative to the largest), and whether
``uses_phase_split`` picks the split for that convolution: the thresholds there come from this table.

    python bench/strided_conv.py [--sizes 512x512,800x1333 --batch 2 --rounds 5 --threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detr.models.strided_conv import phase_split_weight_grad, uses_phase_split  # noqa: E402

# (network, stage): (input channels, output channels, input stride against the image).
CONVOLUTIONS = {
    ("resnet50", "layer2"): (128, 128, 4),
    ("resnet50", "layer3"): (256, 256, 8),
    ("resnet50", "layer4"): (512, 512, 16),
    ("resnet18", "layer2"): (64, 128, 4),
    ("resnet18", "layer3"): (128, 256, 8),
    ("resnet18", "layer4"): (256, 512, 16),
}


def map_size(image: int, stride: int) -> int:
    """The ResNet's feature-map extent at ``stride`` (4, 8, 16) for an image extent: the stem's 7x7 stride-2
    convolution and 3x3 stride-2 pooling, then a stride-2 3x3 convolution per stage."""
    size = (image + 2 * 3 - 7) // 2 + 1
    size = (size + 2 - 3) // 2 + 1
    while stride > 4:
        size = (size + 2 - 3) // 2 + 1
        stride //= 2
    return size


def best_ms(call, rounds: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512x512,800x1333", help="comma-separated HEIGHTxWIDTH image sizes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each form, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    try:
        sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
        assert all(len(size) == 2 and min(size) >= 32 for size in sizes)
    except (ValueError, AssertionError):
        parser.error(f"--sizes {args.sizes!r}: expected HEIGHTxWIDTH[,HEIGHTxWIDTH...], each at least 32x32")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, best of {args.rounds}; "
          f"ratio = oneDNN / phase split")
    print(f"{'image':>10} {'convolution':<17} {'input':>22} {'oneDNN ms':>10} {'split ms':>9} {'ratio':>6} "
          f"{'apart':>8}  split used")
    generator = torch.Generator().manual_seed(0)
    for height, width in sizes:
        for (network, stage), (in_channels, out_channels, stride) in CONVOLUTIONS.items():
            shape = (args.batch, in_channels, map_size(height, stride), map_size(width, stride))
            x = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator)
            weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
            grad_output = torch.nn.functional.conv2d(x, weight.detach(), None, 2, 1)
            grad_output = torch.randn(grad_output.shape, generator=generator).contiguous(
                memory_format=torch.channels_last)

            def onednn():
                return torch.ops.aten.convolution_backward(grad_output, x, weight, None, (2, 2), (1, 1), (1, 1),
                                                           False, (0, 0), 1, (False, True, False))[1]

            def split():
                return phase_split_weight_grad(grad_output, x, weight)

            reference = onednn()
            apart = ((split() - reference).abs().max() / reference.abs().max()).item()
            times = {"onednn": [], "split": []}
            for _ in range(args.rounds):
                for name, call in (("onednn", onednn), ("split", split)):
                    times[name].append(best_ms(call, 1))
            onednn_ms, split_ms = min(times["onednn"]), min(times["split"])
            used = uses_phase_split(x, weight, 2, 1, 1, 1)
            print(f"{height:>4}x{width:<5} {network + ' ' + stage:<17} {str(list(shape)):>22} {onednn_ms:10.2f} "
                  f"{split_ms:9.2f} {onednn_ms / split_ms:5.2f}x {apart:8.1e}  {'yes' if used else 'no'}", flush=True)


if __name__ == "__main__":
    main()
