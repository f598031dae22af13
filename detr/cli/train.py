"""`detr train` and `detr evaluate`: a config in, a trained and tracked model out; metrics of a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from detr.cli.common import _add_config_args, _command, _overrides, _print_metrics, _print_serve_hint
from detr.errors import DetrError


def _add_train_commands(commands) -> None:
    p = _command(commands, "train", "train a model as a config says, tracked in MLflow",
                 ["detr train configs/deformable_detr_tiny.yaml",
                  "detr train configs/detr_tiny.yaml -o train.epochs=5 -o train.lr=2e-4",
                  "detr train configs/detr_tiny.yaml --resume auto",
                  "torchrun --nproc-per-node 2 -m detr.cli train configs/detr_tiny.yaml",
                  "detr train configs/detr_tiny.yaml --workers 2",
                  "RAY_ADDRESS=10.0.0.5:6379 detr train configs/deformable_detr_r50.yaml --workers 8 --gpus-per-worker 1"])
    _add_config_args(p, required=False)
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue exactly from a checkpoint, or the newest one in train.checkpoint.dir")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    ray_group = p.add_argument_group("data parallel on Ray Train (instead of one process or torchrun)")
    ray_group.add_argument("--workers", type=int, metavar="N",
                           help="train in N Ray Train workers (DDP: gloo on CPU, NCCL on GPU); train.batch_size is "
                                "per worker")
    ray_group.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="(default 1)")
    ray_group.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="(default 0)")
    ray_group.add_argument("--address", help="an existing Ray cluster (default: RAY_ADDRESS, else Ray on this "
                                             "machine)")
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
    from detr.run import train_from_config

    ray_flags = [flag for flag, value, default in (("--cpus-per-worker", args.cpus_per_worker, 1.0),
                                                   ("--gpus-per-worker", args.gpus_per_worker, 0.0),
                                                   ("--address", args.address, None)) if value != default]
    if args.workers is None and ray_flags:
        raise DetrError(f"{', '.join(ray_flags)} need --workers N (training on Ray Train)")
    if args.workers is not None and "WORLD_SIZE" in os.environ:
        raise DetrError("--workers starts its own Ray Train workers: do not combine it with torchrun")
    config = load_config(args.config, _overrides(args))
    if args.workers is not None:
        from detr.search.ray_train import WorkerGroup, train_on_ray

        outcome = train_on_ray(config, WorkerGroup(args.workers, args.cpus_per_worker, args.gpus_per_worker),
                               address=args.address, resume=args.resume, track=not args.no_track)
    else:
        outcome = train_from_config(config, resume=args.resume, track=not args.no_track)
    print(f"trained {outcome.epochs} epochs ({outcome.steps} steps); checkpoints in {outcome.checkpoint_dir}")
    _print_metrics(outcome.metrics)
    if outcome.run_id:
        from detr.tracking import resolve_tracking_uri, ui_command

        hint = ui_command(resolve_tracking_uri(config.tracking.tracking_uri))
        print(f"MLflow run {outcome.run_id}; to look at it: {hint}")
    if outcome.served_model_uri:
        _print_serve_hint(outcome.served_model_uri)


def _cmd_evaluate(args) -> None:
    import json

    from detr.config import load_config
    from detr.engine.diagnostics import save_report
    from detr.models.detection_params import DEFAULT_SCORE_THRESHOLD
    from detr.run import evaluate_checkpoint_report

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
