"""Helpers the command modules of the CLI share."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _command(group, name: str, help: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    return group.add_parser(
        name,
        help=help,
        description=help,
        epilog=_examples(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("config", type=Path, nargs=None if required else "?", help="YAML config")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. -o train.lr=2e-4 (repeatable)")
    p.add_argument("--overrides", default="", metavar="'K=V K=V'",
                   help="several overrides in one string (what the MLproject passes)")


def _overrides(args) -> list[str]:
    import shlex

    return [*shlex.split(args.overrides), *args.override]


def _print_metrics(metrics: dict[str, float]) -> None:
    headline = [k for k in metrics if k.count("/") == 1]
    for key in headline:
        print(f"  {key:<22} {metrics[key]:.4f}")


def _print_serve_hint(model_uri: str) -> None:
    from detr.tracking import serve_commands

    print(f"the best checkpoint is the pyfunc model {model_uri}; serve it over REST with either of")
    for command in serve_commands(model_uri):
        print(f"  {command}")
