"""`detr ops info|build` and `detr doctor`: the deformable-attention backends and the installation."""

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
