"""`detr demo`: the main job on the embedded defaults (`make demo`, `mlflow run .`)."""

from __future__ import annotations

from pathlib import Path

from detr.cli.common import _command, _overrides, _print_metrics, _print_serve_hint
from detr.errors import DetrError

DEMO_HEADLINE = ("coco/AP", "coco/AP50", "coco/AP75", "voc/mAP50")  # printed at the end


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

