"""`detr tune`: a hyperparameter search with Ray Tune ASHA, recorded in MLflow."""

from __future__ import annotations

from pathlib import Path

from detr.cli.common import _add_config_args, _command, _overrides, _print_serve_hint
from detr.errors import InvalidInputError


def _add_tune_command(commands) -> None:
    p = _command(commands, "tune",
                 "search hyperparameters with Ray Tune ASHA: one MLflow sweep run, a child run per trial, the "
                 "best checkpoint as the sweep's pyfunc model",
                 ["detr tune configs/deformable_detr_tiny.yaml --space configs/tune/tiny_lr.yaml --samples 8",
                  "detr tune configs/detr_tiny.yaml --space configs/tune/tiny_lr.yaml --samples 4 --max-concurrent 2 "
                  "--register shapes --alias champion",
                  "detr tune configs/detr_tiny.yaml --space configs/tune/tiny_lr.yaml --samples 4 --name lr-1 --resume",
                  "RAY_ADDRESS=10.0.0.5:6379 detr tune configs/deformable_detr_r50.yaml --space my_space.yaml "
                  "--samples 32 --gpus-per-trial 1 --storage s3://bucket/tune",
                  "detr tune configs/deformable_detr_r50.yaml --space my_space.yaml --samples 8 --address 10.0.0.5:6379 "
                  "--workers-per-trial 4 --gpus-per-worker 1 --max-failures 3 --storage /nfs/tune"])
    _add_config_args(p, required=True)
    p.add_argument("--space", type=Path, required=True, help="search space YAML (configs/tune/*.yaml)")
    p.add_argument("--samples", type=int, required=True,
                   help="draws of the space (each runs every 'grid' combination)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="trials at a time (default: as resources allow)")
    p.add_argument("--cpus-per-trial", type=float, help="(default 1)")
    p.add_argument("--gpus-per-trial", type=float, help="fractions share a GPU, e.g. 0.5 (default 0)")
    group = p.add_argument_group("data-parallel trials on Ray Train (instead of one process per trial)")
    group.add_argument("--workers-per-trial", type=int, metavar="N",
                       help="each trial is a TorchTrainer of N workers (DDP; train.batch_size is per worker)")
    group.add_argument("--cpus-per-worker", type=float, metavar="C", help="(default 1; needs --workers-per-trial)")
    group.add_argument("--gpus-per-worker", type=float, metavar="G", help="(default 0; needs --workers-per-trial)")
    p.add_argument("--max-failures", type=int, default=2, metavar="K",
                   help="restart a trial whose process or worker died up to K times, from its last checkpoint "
                        "(default 2)")
    p.add_argument("--address", help="an existing Ray cluster (default: RAY_ADDRESS, else Ray on this machine)")
    p.add_argument("--metric", default="coco/AP50",
                   help="what ASHA compares and the best trial maximizes (or minimizes): an evaluation metric such "
                        "as coco/AP50, coco/AP, voc/mAP50, or train/loss_mean (default coco/AP50)")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial (default 1)")
    p.add_argument("--reduction-factor", type=float, default=2.0,
                   help="ASHA keeps the best 1/F of the trials at each rung (default 2)")
    p.add_argument("--name", help="name of the search (default: the space file's name and the time); "
                                  "--resume needs it")
    p.add_argument("--storage", default="outputs/tune", help="where Ray keeps the search's state and checkpoints "
                                                             "(shared storage on a cluster, e.g. s3://...)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search --name")
    p.add_argument("--register", metavar="NAME", help="register the best model under this name")
    p.add_argument("--alias", help="alias of the registered version (default champion; needs --register)")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> None:
    from detr.config import load_config
    from detr.search.space import load_search_space
    from detr.tracking import ui_command
    from detr.search.tune import run_search

    if args.alias and not args.register:
        raise InvalidInputError("--alias needs --register NAME")
    per_worker = [flag for flag, value in (("--cpus-per-worker", args.cpus_per_worker),
                                           ("--gpus-per-worker", args.gpus_per_worker)) if value is not None]
    per_trial = [flag for flag, value in (("--cpus-per-trial", args.cpus_per_trial),
                                          ("--gpus-per-trial", args.gpus_per_trial)) if value is not None]
    if per_worker and args.workers_per_trial is None:
        raise InvalidInputError(f"{', '.join(per_worker)} need --workers-per-trial N")
    if per_trial and args.workers_per_trial is not None:
        raise InvalidInputError(f"{', '.join(per_trial)} are for one-process trials: with --workers-per-trial give "
                                "--cpus-per-worker / --gpus-per-worker")
    workers = None
    if args.workers_per_trial is not None:
        from detr.search.ray_train import WorkerGroup

        workers = WorkerGroup(args.workers_per_trial, 1.0 if args.cpus_per_worker is None else args.cpus_per_worker,
                              0.0 if args.gpus_per_worker is None else args.gpus_per_worker)
    config = load_config(args.config, _overrides(args))
    space = load_search_space(args.space)
    outcome = run_search(
        config, space, num_samples=args.samples, max_concurrent_trials=args.max_concurrent, address=args.address,
        resources_per_trial=None if workers else {"cpu": 1.0 if args.cpus_per_trial is None else args.cpus_per_trial,
                                                  "gpu": args.gpus_per_trial or 0.0},
        workers_per_trial=workers, max_failures=args.max_failures, storage_path=args.storage,
        metric=args.metric, mode=args.mode, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        name=args.name, resume=args.resume,
        register=(args.register, args.alias or "champion") if args.register else None,
    )
    stopped = len(outcome.stopped_early)
    failed = sum(t.status == "failed" for t in outcome.trials)
    retries = sum(t.restarts for t in outcome.trials)
    print(f"search {outcome.name}: {len(outcome.trials)} trials, {stopped} stopped early by ASHA, {failed} failed, "
          f"{retries} restarts after a failure")
    best = outcome.best
    print(f"best trial {best.name}: {outcome.metric} {best.best_value:.4f} after {best.epochs} epochs")
    for key, value in best.params.items():
        print(f"  {key} = {value}")
    print(f"MLflow sweep run {outcome.sweep_run_id}; to look at it: {ui_command(outcome.tracking_uri)}")
    _print_serve_hint(outcome.served_model_uri)
