"""`detr <command>`: the parser and the data, config, train, ops, doctor and demo commands.

The ``detr.cli`` package is the only argparse in the project; ``checkpoints``, ``serving`` and
``tune`` add their commands to this parser.

Each command turns its arguments (and a config, where it takes one) into calls of the library API;
no logic lives here beyond that. A ``DetrError`` is printed on one line and exits with status 2.
Heavy modules (torch, mlflow, ray) are imported inside the command functions so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from detr.cli.checkpoints import _add_convert_command
from detr.cli.common import _command, _examples
from detr.cli.serving import _add_serving_commands
from detr.cli.tune import _add_tune_command
from detr.errors import DetrError

FORMATS = ("coco", "voc", "yolo", "kitti")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr",
        description="DETR and Deformable DETR: data, training, search and serving.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "detr demo",
            "detr data synth --format coco --out data/synth --images 200 --seed 0",
            "detr data stats data/synth",
            "detr config show configs/deformable_detr_tiny.yaml -o train.lr=2e-4",
            "detr ops info",
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    _add_data_commands(commands)
    _add_config_commands(commands)
    _add_train_commands(commands)
    _add_ops_commands(commands)
    _add_doctor_command(commands)
    _add_convert_command(commands)
    _add_demo_command(commands)
    _add_serving_commands(commands)
    _add_tune_command(commands)
    return parser


# ---------------------------------------------------------------------------------------------


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="generate, convert, inspect datasets").add_subparsers(
        dest="data_command", metavar="<data command>", required=True
    )

    p = _command(
        data,
        "synth",
        "generate the synthetic shapes dataset (deterministic for a seed)",
        ["detr data synth --format coco --out data/synth --images 200 --seed 0",
         "detr data synth --format kitti --out data/synth_kitti --images 50 --seed 1 --size 320x240"],
    )
    p.add_argument("--format", choices=FORMATS, default="coco")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--images", type=int, default=200, help="number of images (split train/val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="320x320", help="image size WIDTHxHEIGHT (default 320x320)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images in the val split")
    p.set_defaults(func=_cmd_data_synth)

    p = _command(
        data,
        "convert",
        "convert a dataset between formats (annotations rewritten, images copied or linked)",
        ["detr data convert data/voc --from voc --to coco --out data/voc_as_coco",
         "detr data convert data/synth --from auto --to yolo --out data/synth_yolo"],
    )
    p.add_argument("path", type=Path)
    p.add_argument("--from", dest="src_format", choices=("auto", *FORMATS), default="auto")
    p.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default=None, help="source split to convert (default: all splits)")
    p.set_defaults(func=_cmd_data_convert)

    for name, help_text, examples in (
        ("stats", "class counts, objects per image and box sizes of a dataset or a config's view",
         ["detr data stats data/synth", "detr data stats --config configs/data_kitti_cars.yaml --split train"]),
        ("show", "draw one image with its boxes and save it as PNG",
         ["detr data show data/synth --index 3 --out sample.png"]),
    ):
        p = _command(data, name, help_text, examples)
        p.add_argument("path", type=Path, nargs="?", help="dataset directory (or use --config)")
        p.add_argument("--format", choices=("auto", *FORMATS), default="auto")
        p.add_argument("--split", default=None, help="split (dataset split, or train|val with --config)")
        p.add_argument("--config", type=Path, help="take the sources, labels and view from a config")
        p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
        if name == "stats":
            p.add_argument("--plot", type=Path, help="also save the box-size histogram as PNG")
            p.set_defaults(func=_cmd_data_stats)
        else:
            p.add_argument("--index", type=int, default=0)
            p.add_argument("--out", type=Path, required=True)
            p.set_defaults(func=_cmd_data_show)


def _dataset_from_args(args):
    from detr.data import load_dataset, load_split

    if args.config is not None:
        if args.path is not None:
            raise DetrError("give either a dataset path or --config, not both")
        from detr.config import load_config

        config = load_config(args.config, args.override)
        split = args.split or "train"
        if split not in ("train", "val"):
            raise DetrError(f"--split with --config must be 'train' or 'val', got {split!r}")
        return load_split(config.data, split)
    if args.path is None:
        raise DetrError("give a dataset path or --config")
    return load_dataset(args.path, format=args.format, split=args.split)


def _cmd_data_synth(args) -> None:
    from detr.data.synth import generate_synthetic_dataset

    width, height = _parse_size(args.size)
    out = generate_synthetic_dataset(
        args.out,
        format=args.format,
        num_images=args.images,
        seed=args.seed,
        image_size=(width, height),
        val_fraction=args.val_fraction,
    )
    print(f"wrote {args.images} images in {args.format} format to {out}")


def _cmd_data_convert(args) -> None:
    from detr.data.convert import convert_dataset

    report = convert_dataset(args.path, args.out, src_format=args.src_format, dst_format=args.dst_format,
                             split=args.split)
    print(report)


def _cmd_data_stats(args) -> None:
    from detr.data.stats import compute_stats, plot_box_sizes

    dataset = _dataset_from_args(args)
    stats = compute_stats(dataset)
    print(stats.format())
    if args.plot is not None:
        plot_box_sizes(stats, args.plot)
        print(f"box-size histogram saved to {args.plot}")


def _cmd_data_show(args) -> None:
    from detr.data.show import save_drawn_record

    dataset = _dataset_from_args(args)
    path = save_drawn_record(dataset, args.index, args.out)
    print(f"saved {path}")


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DetrError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 320x240") from None
    if width < 32 or height < 32:
        raise DetrError(f"--size {text!r}: width and height must be at least 32 pixels")
    return width, height


# ---------------------------------------------------------------------------------------------
# detr config ...
# ---------------------------------------------------------------------------------------------


def _add_config_commands(commands) -> None:
    config = commands.add_parser("config", help="show or validate a config").add_subparsers(
        dest="config_command", metavar="<config command>", required=True
    )
    for name, help_text in (
        ("show", "print the resolved config (defaults + file + overrides)"),
        ("validate", "check a config and report the first problems found"),
    ):
        p = _command(config, name, help_text, [f"detr config {name} configs/detr_tiny.yaml -o train.lr=2e-4"])
        p.add_argument("path", type=Path, nargs="?", help="YAML config (default: built-in defaults)")
        p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. -o train.lr=2e-4 (repeatable)")
        if name == "show":
            p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
        p.set_defaults(func=_cmd_config_show if name == "show" else _cmd_config_validate)


def _cmd_config_show(args) -> None:
    from detr.config import load_config

    config = load_config(args.path, args.override)
    print(config.to_json() if args.json else config.to_yaml(), end="" if not args.json else "\n")


def _cmd_config_validate(args) -> None:
    from detr.config import load_config

    load_config(args.path, args.override)
    print(f"{args.path or '<defaults>'}: valid")


# ---------------------------------------------------------------------------------------------
# detr train / evaluate
# ---------------------------------------------------------------------------------------------


def _add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("config", type=Path, nargs=None if required else "?", help="YAML config")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. -o train.lr=2e-4 (repeatable)")
    p.add_argument("--overrides", default="", metavar="'K=V K=V'",
                   help="several overrides in one string (what the MLproject passes)")


def _overrides(args) -> list[str]:
    import shlex

    return [*shlex.split(args.overrides), *args.override]


def _add_train_commands(commands) -> None:
    p = _command(commands, "train", "train a model as a config says, tracked in MLflow",
                 ["detr train configs/deformable_detr_tiny.yaml",
                  "detr train configs/detr_tiny.yaml -o train.epochs=5 -o train.lr=2e-4",
                  "detr train configs/detr_tiny.yaml --resume auto",
                  "torchrun --nproc-per-node 2 -m detr.cli train configs/detr_tiny.yaml"])
    _add_config_args(p, required=False)
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue exactly from a checkpoint, or the newest one in train.checkpoint.dir")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_cmd_train)

    p = _command(commands, "evaluate", "COCO and VOC metrics of a checkpoint on a dataset split, and why it fails",
                 ["detr evaluate outputs/checkpoints/best.pt",
                  "detr evaluate best.pt --config configs/data_other.yaml --split val --json metrics.json",
                  "detr evaluate best.pt --score-threshold 0.3 --report outputs/report"])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--config", type=Path, help="take the data from this config (default: the checkpoint's)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--overrides", default="", metavar="'K=V K=V'")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.add_argument("--mlflow-run", metavar="RUN_ID",
                   help="also log the metrics to this MLflow run (e.g. the training run) as evaluate/<split>/...")
    p.add_argument("--score-threshold", type=float, metavar="S",
                   help="score a detection needs for the confusion matrix, recall and drawn images "
                        "(default: the one a served model applies when a request names none)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="also write the diagnostics (confusion matrix, TIDE errors, per-class table, worst images) "
                        "into DIR")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_train(args) -> None:
    from detr.config import load_config
    from detr.engine.run import train_from_config

    config = load_config(args.config, _overrides(args))
    outcome = train_from_config(config, resume=args.resume, track=not args.no_track)
    print(f"trained {outcome.epochs} epochs ({outcome.steps} steps); checkpoints in {outcome.checkpoint_dir}")
    _print_metrics(outcome.metrics)
    if outcome.run_id:
        from detr.tracking import resolve_tracking_uri, ui_command

        hint = ui_command(resolve_tracking_uri(config.tracking.tracking_uri))
        print(f"MLflow run {outcome.run_id}; to look at it: {hint}")
    if outcome.served_model_uri:
        _print_serve_hint(outcome.served_model_uri)


def _print_serve_hint(model_uri: str) -> None:
    from detr.tracking import serve_commands

    print(f"the best checkpoint is the pyfunc model {model_uri}; serve it over REST with either of")
    for command in serve_commands(model_uri):
        print(f"  {command}")


def _cmd_evaluate(args) -> None:
    import json

    from detr.config import load_config
    from detr.engine.diagnostics import save_report
    from detr.engine.run import evaluate_checkpoint_report
    from detr.models.postprocess import DEFAULT_SCORE_THRESHOLD

    overrides = _overrides(args)
    config = load_config(args.config, overrides) if args.config or overrides else None
    if config is None and overrides:
        raise DetrError("overrides need --config")
    threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
    if not 0.0 <= threshold <= 1.0:
        raise DetrError(f"--score-threshold must be in [0, 1], got {threshold}")
    metrics, report = evaluate_checkpoint_report(args.checkpoint, config=config, split=args.split,
                                                 batch_size=args.batch_size, score_threshold=threshold)
    _print_metrics(metrics)
    print(report.summary())
    if args.report:
        save_report(report, args.report)
        print(f"diagnostics written to {args.report}")
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {args.json}")
    if args.mlflow_run:
        from detr.tracking import log_diagnostic_report, log_evaluation_to_run

        log_evaluation_to_run(metrics, args.mlflow_run, checkpoint=args.checkpoint, split=args.split)
        log_diagnostic_report(report, args.mlflow_run, artifact_dir=f"evaluate/{args.split}", log_metrics=False)
        print(f"metrics and diagnostics logged to MLflow run {args.mlflow_run} as evaluate/{args.split}/...")
    elif os.environ.get("MLFLOW_RUN_ID"):  # started by `mlflow run -e evaluate`: the metrics belong to that run
        from detr.tracking import log_diagnostic_report, log_evaluation_to_project_run

        run_id = log_evaluation_to_project_run(metrics, checkpoint=args.checkpoint, split=args.split)
        log_diagnostic_report(report, run_id, artifact_dir="diagnostics", log_metrics=False)
        print(f"metrics and diagnostics logged to MLflow run {run_id}")


def _print_metrics(metrics: dict[str, float]) -> None:
    headline = [k for k in metrics if k.count("/") == 1]
    for key in headline:
        print(f"  {key:<22} {metrics[key]:.4f}")


# ---------------------------------------------------------------------------------------------
# detr ops ... / detr doctor
# ---------------------------------------------------------------------------------------------


def _add_ops_commands(commands) -> None:
    ops = commands.add_parser("ops", help="the deformable-attention op").add_subparsers(
        dest="ops_command", metavar="<ops command>", required=True
    )
    p = _command(ops, "info", "which deformable-attention backends are available, and why not",
                 ["detr ops info", "DETR_MSDA_BACKEND=reference detr ops info"])
    p.set_defaults(func=_cmd_ops_info)
    p = _command(ops, "build", "build the native kernels into the cache now, so that first use is instant",
                 ["detr ops build", "TORCH_CUDA_ARCH_LIST='8.0;9.0' detr ops build --cuda yes"])
    p.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto",
                   help="auto: when a CUDA toolkit and a GPU are present; yes: whenever a toolkit is (no GPU needed)")
    p.set_defaults(func=_cmd_ops_build)


def _cmd_ops_build(args) -> None:
    from detr.ops.build import build_all

    for line in build_all(cuda=args.cuda):
        print(line)


def _cmd_ops_info(args) -> None:
    from detr.ops.dispatch import backend_report

    print(backend_report())


def _add_doctor_command(commands) -> None:
    p = _command(commands, "doctor", "check the installation: versions, devices, op backends, tracking",
                 ["detr doctor"])
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args) -> None:
    import platform

    import torch

    from detr.ops.dispatch import backend_report

    lines = [
        f"python      {platform.python_version()}",
        f"torch       {torch.__version__} (CUDA available: {torch.cuda.is_available()})",
    ]
    for module in ("torchvision", "mlflow", "ray", "pycocotools", "pydantic", "scipy"):
        try:
            mod = __import__(module)
            lines.append(f"{module:<11} {getattr(mod, '__version__', 'installed')}")
        except ImportError as e:
            lines.append(f"{module:<11} MISSING ({e})")
    print("\n".join(lines))
    print(backend_report())


# ---------------------------------------------------------------------------------------------
# detr convert / detr export
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# detr demo
# ---------------------------------------------------------------------------------------------


def _add_demo_command(commands) -> None:
    from detr.demo import DEMO_CONFIG, DEMO_DATA, DEMO_IMAGES

    p = _command(commands, "demo",
                 "the main job: shapes dataset -> train the tiny Deformable DETR -> evaluate, tracked in MLflow",
                 ["detr demo", "detr demo --out outputs/demo2 -o train.epochs=1"])
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="sample image, checkpoints, metrics.json")
    p.add_argument("--data", type=Path, default=DEMO_DATA,
                   help=f"the generated dataset (made when missing, reused when present; default {DEMO_DATA})")
    p.add_argument("--images", type=int, default=DEMO_IMAGES, help="images to generate when --data is missing")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG, help=f"the preset to train (default {DEMO_CONFIG})")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied after the demo's data and output paths (repeatable)")
    p.add_argument("--overrides", default="", metavar="'K=V K=V'", help="the same, space-separated in one string")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> None:
    from detr.demo import run_demo

    if args.images < 2:
        raise DetrError(f"--images {args.images}: the demo needs at least 2 images (a train and a val split)")
    result = run_demo(args.out, data=args.data, images=args.images, seed=args.seed, config_path=args.config,
                      overrides=_overrides(args))
    print("demo: metrics of the best checkpoint on the validation split:")
    _print_metrics({k: v for k, v in result.metrics.items() if k in DEMO_HEADLINE})
    print(f"demo: done. Checkpoints in {result.checkpoint.parent}, metrics in {args.out / 'metrics.json'}")
    if result.run_id:
        print(f"demo: MLflow run {result.run_id} in {result.tracking_uri}; to look at it, run")
        print(f"  {result.ui_command()}")
    if result.served_model_uri:
        _print_serve_hint(result.served_model_uri)


DEMO_HEADLINE = ("coco/AP", "coco/AP50", "coco/AP75", "voc/mAP50")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except DetrError as e:
        prefix = "error: " if e.exit_code == 2 else ""
        print(f"detr: {prefix}{' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("detr: interrupted", file=sys.stderr)
        return 130
    return 0

