"""DETR and Deformable DETR against Hugging Face transformers: the same architecture, the same weights.

For each architecture a transformers model is built with random weights (an R50 ResNet of
transformers' own, nothing downloaded), saved, and converted with ``detr convert --source hf``; our
model is that checkpoint. Before any timing the outputs of both are compared on the benchmark batch
(eval mode); a difference above 1e-4 stops the run. Then, in one process and interleaved (ours,
theirs, ours, ...) so that a busy machine slows both alike:

* inference: a forward pass of the batch without autograd;
* training step: forward, loss, backward and an AdamW step (each model with its own loss code, on
  the same targets; the fused AdamW for both, each library's default).

Ours runs once with the native deformable-attention kernel and once with the grid_sample reference
(``DETR_MSDA_BACKEND``); DETR has no deformable attention, so its two rows measure the same code.
Ratios above 1 mean ours is faster.

Each row ends with the arithmetic floor: the floating-point operations of the matrix products and
convolutions (``torch.utils.flop_counter``, the same count for both libraries, printed) at the float32
matrix-product rate measured in the same run and threads (in every round; the best is kept). No
implementation of the same architecture in float32 gets below it, so transformers' time over the
floor is the largest lead any of them could have over transformers on this machine.

    python bench/peer.py                       # both architectures, batch 2 at 512x512, 3 timed runs
    python bench/peer.py --arch deformable_detr --size 320x320 --repeats 5 --threads 2
    python bench/peer.py --channels-last       # ours with model.backbone.channels_last=true

transformers is a bench extra (``pip install 'mlflow-detr[bench]'``). Results are in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_step import NUM_CLASSES, random_batch  # bench/ is this script's directory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHS = ("detr", "deformable_detr")
TOLERANCE = 1e-4


def build_peer(arch: str, seed: int = 0):
    """A transformers model of the paper's R50 architecture with random weights."""
    import transformers

    backbone = transformers.ResNetConfig(
        depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
        out_features=["stage4"] if arch == "detr" else ["stage2", "stage3", "stage4"],
    )
    labels = {i: f"class{i}" for i in range(NUM_CLASSES)}
    common = dict(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                  id2label=labels, dropout=0.0)
    torch.manual_seed(seed)  # transformers initialises from the global RNG
    if arch == "detr":
        return transformers.DetrForObjectDetection(transformers.DetrConfig(num_queries=100, **common))
    config = transformers.DeformableDetrConfig(num_queries=300, num_feature_levels=4, encoder_n_points=4,
                                               decoder_n_points=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                                               **common)
    return transformers.DeformableDetrForObjectDetection(config)


def train_official_backbone_stages(peer, ours) -> None:
    """Make transformers train the backbone parameters that official DETR (and ours) trains.

    transformers means to train ResNet stages 2-4 (official DETR's layer2-layer4) but tests its own
    ResNet's parameter names ("...stages.1...") for "stage.1", so its whole backbone stays frozen and
    its backward skips every backbone weight gradient. Unfrozen here, both steps do the same work;
    the counts of trainable parameters must then be equal.
    """
    for name, parameter in peer.named_parameters():
        if re.search(r"backbone\..*\.stages\.[123]\.", name):
            parameter.requires_grad_(True)
    counts = [sum(p.numel() for p in model.parameters() if p.requires_grad) for model in (ours, peer)]
    if counts[0] != counts[1]:
        raise SystemExit(f"trainable parameters differ: ours {counts[0]}, transformers {counts[1]}")


def ours_from(peer, workdir: Path, channels_last: bool = False):
    """Our model converted from the peer's saved weights (the converter users run); with
    ``channels_last``, the same weights in a model built with ``model.backbone.channels_last``."""
    from detr import convert_checkpoint, load_model
    from detr.models.build import build_model

    peer.save_pretrained(workdir / "peer")
    checkpoint = convert_checkpoint(workdir / "peer", "hf", out=workdir / "ours.pt")
    model, config, _ = load_model(checkpoint)
    if channels_last:
        backbone = config.model.backbone.model_copy(update={"channels_last": True})
        config = config.model_copy(update={"model": config.model.model_copy(update={"backbone": backbone})})
        converted = model
        model = build_model(config.model, NUM_CLASSES)
        model.load_state_dict(converted.state_dict())
    return model, config


def compare_outputs(ours, peer, images, masks) -> float:
    ours.eval()
    peer.eval()
    with torch.no_grad():
        mine = ours(images, masks)
        theirs = peer(pixel_values=images, pixel_mask=(~masks).long())
    return max((mine["pred_logits"] - theirs.logits).abs().max().item(),
               (mine["pred_boxes"] - theirs.pred_boxes).abs().max().item())


class Runner:
    """One model's inference and training step, with its own loss and optimizer."""

    def __init__(self, name: str, model, step_loss, lr: float = 1e-4) -> None:
        self.name = name
        self.model = model
        self.step_loss = step_loss
        # The fused AdamW: what our Trainer and transformers' Trainer (its default with torch >= 2.8) both run.
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)

    def infer(self, images, masks) -> None:
        self.model.eval()
        with torch.no_grad():
            self.step_loss(self.model, images, masks, None)

    def train_step(self, images, masks, targets) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.step_loss(self.model, images, masks, targets)
        loss.backward()
        self.optimizer.step()


def our_runner(name: str, model, config) -> Runner:
    from detr.models.build import build_criterion

    criterion = build_criterion(config.model, NUM_CLASSES)

    def step_loss(m, images, masks, targets):
        outputs = m(images, masks)
        return None if targets is None else criterion(outputs, targets)["weighted_total"]

    return Runner(name, model, step_loss)


def peer_runner(model) -> Runner:
    def step_loss(m, images, masks, targets):
        labels = None if targets is None else [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        out = m(pixel_values=images, pixel_mask=(~masks).long(), labels=labels)
        return out.loss

    return Runner("transformers", model, step_loss)


def counted_flops(runner: Runner, images, masks, targets) -> dict[str, float]:
    """Floating-point operations of the matrix products and convolutions of one inference and of one
    training step's forward, loss and backward (the optimizer's elementwise update is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    runner.model.eval()
    with FlopCounterMode(display=False) as inference:  # autograd on: the counter's module hooks need it
        runner.step_loss(runner.model, images, masks, None)
    runner.model.train()
    with FlopCounterMode(display=False) as training:
        runner.step_loss(runner.model, images, masks, targets).backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return {"inference": inference.get_total_flops(), "training step": training.get_total_flops()}


def matmul_flops_per_second(size: int = 2048, repeats: int = 10) -> float:
    """The float32 rate of a large square matrix product at torch's current threads, best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, None) for _ in range(repeats))
    return 2 * size**3 / best


def timed(call, backend: str | None) -> float:
    if backend is not None:
        os.environ["DETR_MSDA_BACKEND"] = backend
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def bench_arch(arch: str, size: tuple[int, int], count: int, repeats: int, channels_last: bool = False) -> None:
    peer = build_peer(arch)
    with tempfile.TemporaryDirectory(prefix="peer-") as workdir:
        ours, config = ours_from(peer, Path(workdir), channels_last)
    images, masks, targets = random_batch(count, *size, torch.device("cpu"))
    difference = compare_outputs(ours, peer, images, masks)
    print(f"{arch}: {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters; outputs of ours and "
          f"transformers differ by at most {difference:.1e} (eval, batch {count} at {size[0]}x{size[1]})", flush=True)
    if difference > TOLERANCE:
        raise SystemExit(f"{arch}: outputs differ by {difference:.2e} > {TOLERANCE}: the models are not the same")
    train_official_backbone_stages(peer, ours)

    # Training changes the weights; each runner trains its own copy from the same start.
    runners = {"native": (our_runner("ours", ours, config), "native"),
               "reference": (our_runner("ours", _copy(ours), config), "reference"),
               "transformers": (peer_runner(peer), None)}
    work = {key: counted_flops(runners[key][0], images, masks, targets) for key in ("native", "transformers")}
    print(f"  matrix products and convolutions: inference {work['native']['inference'] / 1e9:.1f} GFLOP "
          f"(transformers {work['transformers']['inference'] / 1e9:.1f}), training step "
          f"{work['native']['training step'] / 1e9:.1f} GFLOP (transformers "
          f"{work['transformers']['training step'] / 1e9:.1f})", flush=True)
    # The rate is measured in every round and the best one kept: a busy moment only lowers a measurement,
    # and the floor must not rise with it.
    rates = [matmul_flops_per_second()]
    for mode in ("inference", "training step"):
        times: dict[str, list[float]] = {key: [] for key in runners}
        for round_index in range(repeats + 1):  # the first round warms up
            rates.append(matmul_flops_per_second())
            for key, (runner, backend) in runners.items():
                call = ((lambda r=runner: r.infer(images, masks)) if mode == "inference"
                        else (lambda r=runner: r.train_step(images, masks, targets)))
                seconds = timed(call, backend)
                if round_index:
                    times[key].append(seconds)
        median = {key: statistics.median(values) for key, values in times.items()}
        floor = work["native"][mode] / max(rates)
        print(f"  {mode:<14} transformers {median['transformers']:7.2f} s | ours native {median['native']:7.2f} s "
              f"({median['transformers'] / median['native']:.2f}x) | ours reference {median['reference']:7.2f} s "
              f"({median['transformers'] / median['reference']:.2f}x) | floor {floor:5.2f} s "
              f"(largest possible lead {median['transformers'] / floor:.2f}x)", flush=True)
    print(f"  float32 matrix product: best {max(rates) / 1e9:.0f} GFLOP/s, worst {min(rates) / 1e9:.0f} "
          f"({len(rates)} measurements, one per round)", flush=True)
    os.environ.pop("DETR_MSDA_BACKEND", None)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(ARCHS), help="comma-separated: detr, deformable_detr")
    parser.add_argument("--size", default="512x512", help="HEIGHTxWIDTH (default 512x512)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true",
                        help="ours with its ResNet in channels-last memory (model.backbone.channels_last)")
    args = parser.parse_args()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if not archs or any(a not in ARCHS for a in archs):
        parser.error(f"--arch {args.arch!r}: choose from {', '.join(ARCHS)}")
    try:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(size) == 2
    except (ValueError, AssertionError):
        parser.error(f"--size {args.size!r}: expected HEIGHTxWIDTH, e.g. 512x512")
    try:
        import transformers
    except ImportError:
        parser.error("transformers is not installed: pip install 'mlflow-detr[bench]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} rounds; ratio = transformers time / ours"
          f"{'; ours channels-last' if args.channels_last else ''}", flush=True)
    for arch in archs:
        bench_arch(arch, size, args.batch, args.repeats, args.channels_last)


if __name__ == "__main__":
    main()
