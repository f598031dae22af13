"""A short real training run of a preset, reported as a learning curve and a throughput.

It trains through ``train_from_config`` (the code path of ``detr train``, without MLflow) and prints,
for every window of ``--window`` optimizer steps, the mean loss, whether every loss was finite, and
the images per second of that window (data loading included); then the evaluation of the last epoch.

    python bench/train_run.py configs/deformable_detr_tiny.yaml -o train.device=cuda -o train.amp=bf16 \\
        -o train.epochs=2 -o data.num_workers=4

Results are in bench/README.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detr.engine.callbacks import Callback  # noqa: E402


class CurveRecorder(Callback):
    """Loss and wall time of every optimizer step, printed as one line per window of steps."""

    def __init__(self, window: int, batch_size: int) -> None:
        self.window = window
        self.batch_size = batch_size
        self.losses: list[float] = []
        self.times: list[float] = []
        self._last = 0.0

    def on_train_start(self, trainer, state) -> None:
        self._last = time.perf_counter()

    def on_step_end(self, trainer, state, losses) -> None:
        now = time.perf_counter()
        self.losses.append(losses["loss"])
        self.times.append(now - self._last)
        self._last = now
        if len(self.losses) % self.window == 0:
            self._print_window(len(self.losses) - self.window, len(self.losses))

    def on_epoch_end(self, trainer, state, metrics) -> None:
        # The evaluation ran between two steps: it must not count as training time.
        self._last = time.perf_counter()
        if metrics:
            shown = {k: round(v, 4) for k, v in metrics.items() if k in ("coco/AP", "coco/AP50", "voc/mAP50")}
            print(f"epoch {state.epoch}: {shown}", flush=True)

    def _print_window(self, first: int, end: int) -> None:
        losses = self.losses[first:end]
        finite = [x for x in losses if math.isfinite(x)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        seconds = sum(self.times[first:end])
        print(f"steps {first + 1:>5}-{end:<5} mean loss {mean:8.3f}  non-finite {len(losses) - len(finite)}  "
              f"{len(losses) * self.batch_size / seconds:8.1f} img/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--window", type=int, default=50, help="steps per printed line (default 50)")
    args = parser.parse_args()

    import torch

    from detr.config import load_config
    from detr.run import train_from_config

    with tempfile.TemporaryDirectory(prefix="train-run-") as scratch:
        config = load_config(args.config, [*args.override, f"train.checkpoint.dir={scratch}/checkpoints"])
        train = config.train
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and train.device != "cpu" else "cpu"
        print(f"{args.config.name}: {device}, amp {train.amp}, batch {train.batch_size}, epochs {train.epochs}, "
              f"torch {torch.__version__}", flush=True)
        recorder = CurveRecorder(args.window, train.batch_size * train.grad_accum_steps)
        started = time.perf_counter()
        outcome = train_from_config(config, callbacks=[recorder], track=False, progress=False)
        elapsed = time.perf_counter() - started
        finite = [x for x in recorder.losses if math.isfinite(x)]
        head, tail = finite[: args.window], finite[-args.window:]
        throughput = len(recorder.losses) * recorder.batch_size / max(sum(recorder.times), 1e-9)
        print(f"{outcome.steps} steps in {elapsed:.0f} s (evaluations included); loss {sum(head) / len(head):.3f} "
              f"(first {len(head)} steps) -> {sum(tail) / len(tail):.3f} (last {len(tail)}); non-finite losses "
              f"{len(recorder.losses) - len(finite)}; training {throughput:.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
