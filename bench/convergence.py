"""How fast DETR and Deformable DETR learn, with and without the training aids: COCO AP50 against
minutes of training, for a fixed training time per variant.

Each variant trains through ``train_from_config`` (the code path of ``detr train``) for
``--minutes`` of training time; every ``--eval-minutes`` of training it evaluates the validation
split (the evaluation's time is not counted). The AP50-per-minute curves of all variants go into
ONE plot, logged with the table to one MLflow run (``convergence.png``, ``convergence.json``, and an
``ap50/<variant>`` metric per evaluation whose step is the training second); the table is printed.

    detr data synth --format coco --out data/synth_small --images 3700 --size 160x160 --val-fraction 0.054
    python bench/convergence.py --minutes 10 --eval-minutes 1

Variants: ``--variant NAME=CONFIG[;KEY=VALUE;...]`` (repeatable; the overrides as ``detr train -o``);
without any, the four below. Shared overrides (``-o``) apply to every variant, e.g. the data.
The learning-rate schedule is each preset's (planned over its epochs), so a variant stopped by the
clock is where that recipe stands after so many minutes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detr.engine.callbacks import Callback  # noqa: E402

# Denoising as DINO: contrastive negatives, box noise 1.0, a quarter of the labels redrawn (DINO's
# 0.5 ratio flips half of that share). DETR needs box queries for it: its two-stage path.
DN = ["model.training_aids.denoising={enabled: true, contrastive: true, box_noise_scale: 1.0, "
      "label_noise_ratio: 0.25}"]
DEFAULT_VARIANTS = {
    "detr": ("configs/detr_tiny.yaml", []),
    "detr-aids": ("configs/detr_tiny.yaml", ["model.detr.two_stage=true", *DN]),
    "deformable": ("configs/deformable_detr_tiny.yaml", []),
    "deformable-aids": ("configs/deformable_detr_tiny.yaml",
                        [*DN, "model.training_aids.one_to_many={num_queries: 120, repeats: 4}"]),
}


class TimeUp(Exception):
    """The variant's training time is spent (raised from a callback to end the run)."""


@dataclass
class Curve:
    name: str
    minutes: list[float] = field(default_factory=list)
    ap50: list[float] = field(default_factory=list)
    ap: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


class ClockedEvaluation(Callback):
    """Counts training time only (evaluations excluded), evaluates every ``every`` seconds of it and
    ends the run after ``budget`` seconds with a last evaluation."""

    def __init__(self, curve: Curve, every: float, budget: float) -> None:
        self.curve, self.every, self.budget = curve, every, budget
        self.trained = 0.0
        self._since = 0.0
        self._next = every

    def on_train_start(self, trainer, state) -> None:
        self._since = time.perf_counter()

    def on_step_end(self, trainer, state, losses) -> None:
        now = time.perf_counter()
        self.trained += now - self._since
        if self.trained >= self._next or self.trained >= self.budget:
            self._evaluate(trainer, state.step)
            self._next += self.every
        if self.trained >= self.budget:
            raise TimeUp
        self._since = time.perf_counter()

    def on_epoch_end(self, trainer, state, metrics) -> None:
        # The trainer's own end-of-epoch evaluation is not training time either.
        self._since = time.perf_counter()

    def on_train_end(self, trainer, state, status) -> None:
        # The schedule ended before the clock: a last point at the end of training.
        if status == "finished" and (not self.curve.steps or self.curve.steps[-1] != state.step):
            self._evaluate(trainer, state.step)

    def _evaluate(self, trainer, step: int) -> None:
        metrics = trainer.evaluate()
        trainer.model.train()  # evaluate() leaves the model in eval mode; the epoch goes on
        self.curve.minutes.append(self.trained / 60)
        self.curve.ap50.append(metrics.get("coco/AP50", float("nan")))
        self.curve.ap.append(metrics.get("coco/AP", float("nan")))
        self.curve.steps.append(step)
        print(f"  {self.curve.name}: {self.trained / 60:5.2f} min, step {step}: AP50 {self.curve.ap50[-1]:.3f} "
              f"AP {self.curve.ap[-1]:.3f}", flush=True)


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"--variant {text!r}: expected NAME=CONFIG[;KEY=VALUE;...]")
    config, *overrides = rest.split(";")
    return name, config, [o for o in overrides if o]


def train_variant(name: str, config_path: str, overrides: list[str], shared: list[str], minutes: float,
                  eval_minutes: float, scratch: Path) -> Curve:
    from detr.config import load_config
    from detr.run import train_from_config

    curve = Curve(name)
    # The trainer's own per-epoch evaluations are pushed out of the way: the clock decides.
    config = load_config(config_path, [*overrides, *shared, f"train.checkpoint.dir={scratch / name}",
                                       "train.eval_every_epochs=1000"])
    clock = ClockedEvaluation(curve, eval_minutes * 60, minutes * 60)
    print(f"{name}: {config_path} {' '.join(overrides)}", flush=True)
    try:
        train_from_config(config, callbacks=[clock], track=False, progress=False)
    except TimeUp:
        pass
    return curve


def plot(curves: list[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in curves:
        ax.plot(curve.minutes, curve.ap50, marker="o", label=curve.name)
    ax.set_xlabel("training time (minutes, evaluations excluded)")
    ax.set_ylabel("COCO AP50 (validation)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(curves: list[Curve]) -> str:
    marks = sorted({round(m, 1) for c in curves for m in c.minutes})
    lines = [f"{'variant':<18}" + "".join(f"{m:>8.1f}" for m in marks) + f"{'steps':>8}",
             "-" * (18 + 8 * len(marks) + 8)]
    for curve in curves:
        by_minute = {round(m, 1): a for m, a in zip(curve.minutes, curve.ap50)}
        cells = "".join(f"{by_minute[m]:>8.3f}" if m in by_minute else f"{'':>8}" for m in marks)
        lines.append(f"{curve.name:<18}{cells}{curve.steps[-1] if curve.steps else 0:>8}")
    return "\n".join(lines)


def log_to_mlflow(curves: list[Curve], png: Path, summary: dict, tracking_uri: str | None, experiment: str) -> str:
    import mlflow

    from detr.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="convergence") as run:
        mlflow.log_params({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
        for curve in curves:
            key = "ap50/" + re.sub(r"[^\w./: -]", "-", curve.name)  # MLflow's allowed metric-name characters
            for minutes, ap50 in zip(curve.minutes, curve.ap50):
                mlflow.log_metric(key, ap50, step=round(minutes * 60))
        mlflow.log_artifact(str(png))
        mlflow.log_dict({**summary, "curves": [vars(c) for c in curves]}, "convergence.json")
        return run.info.run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time per variant (default 10)")
    parser.add_argument("--eval-minutes", type=float, default=1.0, help="evaluate every so many minutes (default 1)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=CONFIG[;KEY=VALUE...]")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every variant (e.g. train.device=cpu, the data paths)")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="convergence-bench")
    parser.add_argument("--out", type=Path, default=Path("outputs/convergence"))
    parser.add_argument("--note", default="", help="machine and load, written into the plot title and the run")
    args = parser.parse_args(argv)

    import torch

    variants = [parse_variant(v) for v in args.variant] or [(n, c, o) for n, (c, o) in DEFAULT_VARIANTS.items()]
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    print(f"convergence: {len(variants)} variants x {args.minutes} min, evaluation every {args.eval_minutes} min; "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}. {args.note}", flush=True)
    curves = []
    with tempfile.TemporaryDirectory(prefix="convergence-") as scratch:
        for name, config_path, overrides in variants:
            torch.manual_seed(0)
            curves.append(train_variant(name, config_path, overrides, args.override, args.minutes,
                                        args.eval_minutes, Path(scratch)))
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "convergence.png"
    title = f"AP50 per training minute ({device}, {torch.get_num_threads()} threads) {args.note}".strip()
    plot(curves, png, title)
    print(table(curves))
    summary = {"minutes": args.minutes, "eval_minutes": args.eval_minutes, "device": device,
               "threads": torch.get_num_threads(), "note": args.note,
               "variants": [f"{n}={c};{';'.join(o)}" for n, c, o in variants]}
    run_id = log_to_mlflow(curves, png, summary, args.tracking_uri, args.experiment)
    print(f"plot: {png}; MLflow run {run_id}", flush=True)


if __name__ == "__main__":
    main()
