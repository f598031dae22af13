"""Time of one training step of a preset: forward, set criterion, backward, clipping, AdamW.

The model, criterion and optimizer are built from the preset as ``detr train`` builds them (random
weights: nothing is downloaded); the batch is random images of one size with a few random boxes each,
so data loading is not part of the time. Each (preset, precision) runs ``--warmup`` untimed steps and
then ``--steps`` timed ones (CUDA events on a GPU); the median is reported with images/s and the peak
GPU memory.

    python bench/train_step.py --device cuda --amp none,bf16                       # R50 presets, 800x1333, batch 2
    python bench/train_step.py --configs configs/deformable_detr_tiny.yaml --size 160x160 --batch 8 --device cpu

Results are in bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = "configs/detr_r50.yaml,configs/deformable_detr_r50.yaml"
NUM_CLASSES = 91  # COCO's class count: the classification head has the size of a real training
BOXES_PER_IMAGE = 7  # COCO's mean number of objects per image


def random_batch(batch: int, height: int, width: int, device: torch.device, seed: int = 0):
    """Normalized-looking images [B, 3, H, W], an all-valid mask [B, H, W] and cxcywh targets."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g)
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        wh = 0.05 + 0.3 * torch.rand(BOXES_PER_IMAGE, 2, generator=g)
        centre = wh / 2 + (1 - wh) * torch.rand(BOXES_PER_IMAGE, 2, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, wh], 1).to(device)})
    return images.to(device), masks.to(device), targets


def time_steps(config_path: Path, *, amp: str, device: torch.device, batch: int, height: int, width: int,
               warmup: int, steps: int) -> dict:
    from detr.config import load_config
    from detr.engine.optim import build_optimizer
    from detr.models.build import build_criterion, build_model

    config = load_config(config_path)
    train = config.train
    torch.manual_seed(0)
    model = build_model(config.model, NUM_CLASSES).to(device).train()
    criterion = build_criterion(config.model, NUM_CLASSES).to(device).train()
    optimizer = build_optimizer(model, lr=train.lr, lr_backbone=train.lr_backbone,
                                lr_linear_proj_mult=train.lr_linear_proj_mult, weight_decay=train.weight_decay)
    images, masks, targets = random_batch(batch, height, width, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "none" else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            outputs = model(images, masks)
            loss = criterion(outputs, targets)["weighted_total"]
        scaler.scale(loss).backward()
        if train.clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        return loss.item()  # a host sync, as the trainer's loss logging does

    losses = [step() for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "median_s": median,
        "best_s": min(times),
        "images_per_s": batch / median,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "parameters_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated preset YAML files")
    parser.add_argument("--size", default="800x1333", help="HEIGHTxWIDTH of the batch (default 800x1333)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", default="none,bf16", help="comma-separated: none, bf16, fp16 (CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size!r}: expected HEIGHTxWIDTH, e.g. 800x1333")
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from detr.ops.dispatch import choose_backend

    device = torch.device(args.device)
    backend = choose_backend("auto", device.type)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, batch {args.batch} at {height}x{width}, deformable attention: "
          f"{backend}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32} / cuDNN {torch.backends.cudnn.allow_tf32}")
    print(f"{'preset':<32}{'amp':>6}{'params M':>10}{'step ms':>10}{'best ms':>10}{'img/s':>9}{'peak GB':>9}"
          f"{'finite':>8}")
    for config in args.configs.split(","):
        for amp in args.amp.split(","):
            result = time_steps(ROOT / config if not Path(config).is_absolute() else Path(config), amp=amp,
                                device=device, batch=args.batch, height=height, width=width,
                                warmup=args.warmup, steps=args.steps)
            print(f"{Path(config).stem:<32}{amp:>6}{result['parameters_m']:>10.2f}{result['median_s'] * 1e3:>10.1f}"
                  f"{result['best_s'] * 1e3:>10.1f}{result['images_per_s']:>9.2f}{result['peak_gb']:>9.2f}"
                  f"{str(result['finite']):>8}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
