"""`detr ops info|build` and `detr doctor`: the deformable-attention backends, the installation, and
whether the tracking store, the Ray cluster and the storage a cluster run needs can be reached."""

from __future__ import annotations

from detr.cli.common import _command


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
    p = _command(commands, "doctor",
                 "check the installation (versions, devices, op backends) and reach the tracking store, the Ray "
                 "cluster and the storage; exits 2 when one is unreachable",
                 ["detr doctor",
                  "detr doctor --tracking-uri http://mlflow.internal:5000 --address ray-head:6379 --storage s3://bkt/tune"])
    p.add_argument("--tracking-uri", metavar="URI",
                   help="the MLflow tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="the Ray cluster detr tune/train would connect to (default: RAY_ADDRESS; neither: a local Ray)")
    p.add_argument("--storage", metavar="PATH|URI",
                   help="the storage of a search's state and checkpoints (detr tune --storage): a shared path or "
                        "s3:// / gs:// URI")
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
    checks = _reachability_checks(args.tracking_uri, args.address, args.storage)
    for name, check in checks:
        print(f"{name:<9} {check}")
    if any(line.startswith("UNREACHABLE") for _, line in checks):
        raise SystemExit(2)


def _reachability_checks(tracking_uri: str | None, address: str | None,
                         storage: str | None) -> list[tuple[str, str]]:
    """(name, "ok: ..." | "UNREACHABLE: <what> (<why>)" | "not checked: ...") for each place."""
    import os

    from detr.tracking import resolve_tracking_uri
    from detr.tracking.reachability import storage_reachability, tracking_reachability

    checks = [("tracking", tracking_reachability(resolve_tracking_uri(tracking_uri)).line())]
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        checks.append(("ray", _ray_reachability(address)))
    else:
        checks.append(("ray", "not checked: no --address or RAY_ADDRESS (detr tune starts a Ray on this machine)"))
    if storage:
        checks.append(("storage", storage_reachability(storage).line()))
    else:
        checks.append(("storage", "not checked: no --storage given"))
    return checks


def _ray_reachability(address: str) -> str:
    # The search's own check (a TCP connect to the head), so that the doctor and `detr tune` agree.
    from detr.errors import InvalidInputError
    from detr.search.cluster import _check_reachable

    try:
        _check_reachable(address)
    except InvalidInputError as error:
        return f"UNREACHABLE: Ray cluster at {address} ({error})"
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return f"not checked: {address} (not HOST:PORT; Ray resolves it when it connects)"
    return f"ok: Ray cluster at {address} (its head accepts connections)"
