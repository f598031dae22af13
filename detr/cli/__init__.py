"""`detr <command>`: the parser and ``main``; each command group has its own module (``data``,
``config``, ``train``, ``ops``, ``checkpoints``, ``serving``, ``tune``, ``demo``) that adds its
commands to this parser. The ``detr.cli`` package is the only argparse in the project.

Each command turns its arguments (and a config, where it takes one) into calls of the library API;
no logic lives here beyond that. A ``DetrError`` is printed on one line and exits with status 2.
Heavy modules (torch, mlflow, ray) are imported inside the command functions so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from detr.cli.checkpoints import _add_convert_command
from detr.cli.common import _examples
from detr.cli.config import _add_config_commands
from detr.cli.data import _add_data_commands
from detr.cli.demo import _add_demo_command
from detr.cli.ops import _add_doctor_command, _add_ops_commands
from detr.cli.serving import _add_serving_commands
from detr.cli.train import _add_train_commands
from detr.cli.tune import _add_tune_command
from detr.errors import DetrError


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

