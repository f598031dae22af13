"""Helpers every command module of the CLI shares."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


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


# ---------------------------------------------------------------------------------------------
# detr data ...
