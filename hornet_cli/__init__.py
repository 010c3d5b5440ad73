"""The `hornet` command, whose subcommands each side of the project contributes.

    hornet export --variant hornet_l_gf --fp16
    hornet export --variant hornet_tiny_7x7 --checkpoint hornet_tiny_7x7.pth --out bundles/t7
    hornet verify bundles/t7 --precision bf16
    hornet serve --model-dir bundles/t7 --engine openvino --precision bf16
    hornet tune bundles/t7
    hornet list [--task classify|segment|detect]

A subcommand is a `Command` registered under the `hornet.commands` entry-point group
(pyproject.toml): the exporter contributes `export`, `list` and `verify`, the service
`serve` and `tune`. This package imports neither, so `hornet serve` runs where torch is not
installed and each side adds commands without touching the other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "hornet.commands"
PROG = "hornet"


@dataclass(frozen=True)
class Command:
    """One `hornet NAME` subcommand: its help, its arguments, and what runs them.

    `run` gets the parsed arguments (the subcommand's own, nothing else) and returns the
    exit status.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], object]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    epilog: str | None = None


def installed_commands() -> dict[str, Command]:
    """The subcommands registered under `hornet.commands`, by name."""
    found = entry_points(group=ENTRY_POINT_GROUP)
    return {entry.name: entry.load() for entry in sorted(found, key=lambda e: e.name)}


def _build(commands: dict[str, Command]) -> tuple[argparse.ArgumentParser, argparse.Action]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="HorNet Serve: export HorNet models to verified bundles, and serve them.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands"
    )
    for name, command in commands.items():
        subparser = subparsers.add_parser(
            name,
            help=command.help,
            description=command.description or command.help,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(subparser)
    return parser, subparsers


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The full `hornet` parser, one subparser per command (the installed ones by default)."""
    return _build(installed_commands() if commands is None else commands)[0]


def subcommand_parsers(
    commands: dict[str, Command] | None = None,
) -> dict[str, argparse.ArgumentParser]:
    """The parser each subcommand parses its arguments with, by name."""
    return dict(_build(installed_commands() if commands is None else commands)[1].choices)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hornet`, `python -m hornet_cli` and `python -m model_export`."""
    commands = installed_commands()
    if not commands:
        print(
            f"{PROG}: error: no subcommands are installed (no {ENTRY_POINT_GROUP!r} entry "
            "points): reinstall the package, e.g. pip install -e .",
            file=sys.stderr,
        )
        return 2
    args = build_parser(commands).parse_args(argv)
    command = commands[args.command]
    del args.command
    return command.run(args)
