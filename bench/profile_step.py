"""Where a training step's time goes, by part of the model and by kind of operator.

A preset's model, criterion and optimizer are built as ``detr train`` builds them; the batches come
from the preset's own data pipeline (loader and transforms) over a small generated shapes dataset
(images of ``--image-size``). For ``--steps`` steps after one warm-up step it measures, in wall time:

* data loading: fetching the next batch from the loader;
* forward, by module: backbone, input projections, encoder, decoder, prediction heads (forward hooks;
  the deformable-attention modules inside the encoder and decoder are also summed on their own);
* criterion, and inside it the Hungarian matcher;
* backward, split by the operators ``torch.profiler`` records: convolutions (the backbone),
  deformable attention, matrix products (linear layers and attention), normalization, the rest;
* optimizer: gradient clipping and AdamW.

    python bench/profile_step.py configs/deformable_detr_tiny.yaml
    python bench/profile_step.py configs/deformable_detr_r50.yaml --image-size 1333x800 --batch 2 --steps 2

Results are in bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Operator name fragments -> backward category (first match wins).
BACKWARD_CATEGORIES = (
    ("deformable attention", ("ms_deform_attn", "grid_sampler")),
    ("convolutions", ("convolution",)),
    ("matrix products", ("addmm", "mm", "bmm", "linear", "matmul", "baddbmm", "attention")),
    ("normalization", ("norm",)),
)


TOP_LEVEL = ("data loading", "forward (total)", "criterion (total)", "backward (total)", "optimizer (clip + AdamW)")


class PartTimer:
    """Wall time of named parts of a step; a part may be entered several times per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[int, float] = {}

    @contextmanager
    def part(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def hook(self, module: torch.nn.Module, name: str, *, outside: torch.nn.Module | None = None) -> None:
        """Adds the time of every forward of ``module`` to ``name``; with ``outside``, only of the calls
        made while ``outside`` is not running (box refinement calls the heads inside the decoder,
        where the decoder's time already counts them)."""
        inside = self._running(outside) if outside is not None else None

        def before(mod, args):
            if inside is None or not inside["now"]:
                self._started[id(mod)] = time.perf_counter()

        def after(mod, args, output):
            if id(mod) in self._started:
                self.seconds[name] += time.perf_counter() - self._started.pop(id(mod))

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def _running(self, module: torch.nn.Module) -> dict[str, bool]:
        state = {"now": False}
        module.register_forward_pre_hook(lambda mod, args: state.update(now=True))
        module.register_forward_hook(lambda mod, args, output: state.update(now=False))
        return state


def forward_parts(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The top-level parts of a DETR or Deformable DETR model, and its deformable-attention modules."""
    from detr.models.ms_deform_attn import MSDeformAttn

    transformer = model.transformer
    parts = {
        "forward: backbone": [model.backbone],
        "forward: input projection": _called(model.input_proj),
        "forward: encoder": [transformer.encoder],
        "forward: decoder": [transformer.decoder],
        "forward: heads (after the decoder)": _called(model.class_embed) + _called(model.bbox_embed),
    }
    deformable = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    if deformable:
        parts["forward:   of which deformable attention"] = deformable
    return parts


def _called(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that are actually called: a ModuleList's distinct elements (heads may be shared
    between decoder layers: counted once), else the module itself."""
    if isinstance(module, torch.nn.ModuleList):
        return list({id(m): m for m in module}.values())
    return [module]


def backward_breakdown(profile) -> dict[str, float]:
    """Self CPU seconds of the operators run by the backward (the profile holds only the backward),
    summed by category; the autograd nodes' own bookkeeping lands in "other"."""
    totals: dict[str, float] = defaultdict(float)
    for event in profile.key_averages():
        key = event.key.lower()
        category = next((label for label, fragments in BACKWARD_CATEGORIES if any(f in key for f in fragments)),
                        "other")
        totals[category] += event.self_cpu_time_total / 1e6
    return totals


def generate_data(directory: Path, size: tuple[int, int], images: int) -> None:
    from detr.data.synth import generate_synthetic_dataset

    generate_synthetic_dataset(directory, format="coco", num_images=images, seed=0, image_size=size,
                               val_fraction=0.1, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--image-size", default=None, help="WIDTHxHEIGHT of the generated images "
                                                           "(default: 160x160, 1333x800 for R50 presets)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from detr.config import load_config
    from detr.data.loader import build_loader
    from detr.data.sources import load_splits
    from detr.data.transforms import build_split_transforms
    from detr.engine.optim import build_optimizer
    from detr.models.build import build_criterion, build_model

    r50 = "r50" in args.config.stem
    size_text = args.image_size or ("1333x800" if r50 else "160x160")
    width, height = (int(v) for v in size_text.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="profile-step-") as scratch:
        data_dir = Path(scratch) / "data"
        config = load_config(args.config, args.override)
        batch_size = args.batch or config.train.batch_size
        generate_data(data_dir, (width, height), images=max(4 * batch_size * (args.steps + 1), 20))
        sources = f"[{{path: {data_dir}, format: coco, split: train}}]"
        config = load_config(args.config, [*args.override, f"data.train.sources={sources}", "data.val=null",
                                           f"train.batch_size={batch_size}", "data.num_workers=0"])
        train_set = load_splits(config.data)["train"]
        loader = build_loader(train_set, build_split_transforms(config.data.transforms, "train"),
                              batch_size=batch_size, shuffle=True, num_workers=0, seed=0)
        num_classes = len(train_set.label_map)
        torch.manual_seed(0)
        model = build_model(config.model, num_classes).train()
        criterion = build_criterion(config.model, num_classes).train()
        train = config.train
        optimizer = build_optimizer(model, lr=train.lr, lr_backbone=train.lr_backbone,
                                    lr_linear_proj_mult=train.lr_linear_proj_mult, weight_decay=train.weight_decay)
        timer = PartTimer()
        for name, modules in forward_parts(model).items():
            for module in modules:
                timer.hook(module, name, outside=model.transformer if "heads" in name else None)
        timer.hook(criterion.matcher, "criterion:   of which matching")

        batches = iter(loader)
        backward_seconds: dict[str, float] = defaultdict(float)
        for step in range(args.steps + 1):
            if step == 1:  # the first step warms up: its times are dropped
                timer.seconds.clear()
                backward_seconds.clear()
            with timer.part("data loading"):
                images, masks, targets = next(batches)[:3]
            with timer.part("forward (total)"):
                outputs = model(images, masks)
            with timer.part("criterion (total)"):
                loss = criterion(outputs, targets)["weighted_total"]
            with timer.part("optimizer (clip + AdamW)"):
                optimizer.zero_grad(set_to_none=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                with timer.part("backward (total)"):
                    loss.backward()
            for category, seconds in backward_breakdown(profile).items():
                backward_seconds[category] += seconds
            with timer.part("optimizer (clip + AdamW)"):
                if train.clip_max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip_max_norm)
                optimizer.step()
    # The step is the sum of its parts: the profiler's own start and stop are left out.
    total = sum(timer.seconds[name] for name in TOP_LEVEL)
    steps = args.steps
    print(f"{args.config.name}: batch {batch_size} of {width}x{height} images, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, mean of {steps} steps; step {total / steps * 1e3:.0f} ms")
    rows = [(name, seconds) for name, seconds in timer.seconds.items()]
    order = ["data loading", "forward (total)", *[n for n in forward_parts(model)], "criterion (total)",
             "criterion:   of which matching", "backward (total)"]
    shown = sorted(rows, key=lambda row: order.index(row[0]) if row[0] in order else len(order))
    for name, seconds in shown:
        print(f"  {name:<48}{seconds / steps * 1e3:9.1f} ms {seconds / total * 100:6.1f} %")
        if name == "backward (total)":
            profiled = sum(backward_seconds.values())
            for category, cat_seconds in sorted(backward_seconds.items(), key=lambda kv: -kv[1]):
                # The profiler's self times, scaled to the backward's wall time (the profiler slows it).
                share = cat_seconds / profiled * seconds
                print(f"  {'backward:   ' + category:<48}{share / steps * 1e3:9.1f} ms {share / total * 100:6.1f} %")


if __name__ == "__main__":
    main()
