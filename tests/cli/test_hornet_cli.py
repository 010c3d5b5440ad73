"""The `hornet` command: subcommands contributed through entry points, one parser for all."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import hornet_cli
from hornet_cli import Command

REPO = Path(__file__).resolve().parents[2]


def _echo_command(seen: list[argparse.Namespace]) -> Command:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--times", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        return 7

    return Command(help="echo", add_arguments=add_arguments, run=run)


def test_each_side_contributes_its_subcommands():
    assert set(hornet_cli.installed_commands()) == {"export", "list", "serve", "tune", "verify"}


def test_subcommand_parsers_are_the_ones_hornet_parses_with():
    parsers = hornet_cli.subcommand_parsers()
    assert {name: parser.prog for name, parser in parsers.items()} == {
        "export": "hornet export",
        "list": "hornet list",
        "serve": "hornet serve",
        "tune": "hornet tune",
        "verify": "hornet verify",
    }


def test_main_runs_the_chosen_command_with_only_its_own_arguments(monkeypatch):
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(hornet_cli, "installed_commands", lambda: {"echo": _echo_command(seen)})
    assert hornet_cli.main(["echo", "--times", "3"]) == 7
    assert seen == [argparse.Namespace(times=3)]


@pytest.mark.parametrize("argv", [[], ["deploy"], ["serve", "--model-dirs", "x"]])
def test_a_missing_or_unknown_command_or_flag_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        hornet_cli.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("usage: hornet")


def test_no_installed_commands_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(hornet_cli, "installed_commands", dict)
    assert hornet_cli.main(["serve"]) == 2
    assert "no subcommands are installed" in capsys.readouterr().err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        hornet_cli.main(["--help"])
    assert exit_.value.code == 0
    assert {"export", "list", "serve"} <= set(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("module", "shows"),
    [("hornet_cli", "serve"), ("model_export", "export"), ("service", "--model-dir")],
)
def test_python_dash_m_still_runs_the_command(module: str, shows: str):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert shows in result.stdout
