"""`detr config show|validate`: the resolved config, or the first problems found in one."""

from __future__ import annotations

from pathlib import Path

from detr.cli.common import _command


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
