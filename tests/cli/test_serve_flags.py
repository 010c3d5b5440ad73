"""`hornet serve` flags are generated from `Settings`: one per setting, flag > env > default."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from hornet_cli import subcommand_parsers
from service.cli import load_settings
from service.flags import add_settings_flags, env_name
from service.settings import Settings


@pytest.fixture(autouse=True)
def _no_hornet_environment(monkeypatch):
    for name in [n for n in os.environ if n.upper().startswith("HORNET_")]:
        monkeypatch.delenv(name)


def _serve_parser() -> argparse.ArgumentParser:
    return subcommand_parsers()["serve"]


def test_every_setting_has_a_flag():
    """Every setting, and besides them only --help and --check (a mode, not a setting)."""
    dests = {action.dest for action in _serve_parser()._actions if action.option_strings}
    assert dests - {"help", "check"} == set(Settings.model_fields)


def test_every_setting_has_a_description():
    assert [n for n, f in Settings.model_fields.items() if not f.description] == []


def test_help_names_every_environment_variable():
    text = _serve_parser().format_help()
    missing = [
        env_name(Settings, n) for n in Settings.model_fields if env_name(Settings, n) not in text
    ]
    assert missing == []


def test_help_shows_the_environment_variable_and_the_default():
    assert "(env HORNET_MAX_BATCH_SIZE, default 8)" in " ".join(
        _serve_parser().format_help().split()
    )


def test_help_never_shows_a_secret_default():
    api_key = next(a for a in _serve_parser()._actions if a.dest == "api_keys")
    assert api_key.option_strings == ["--api-key"]
    assert "default" not in api_key.help


# (flag arguments, environment variable, its value, setting, default, from env, from flag)
CASES = {
    "int": (["--max-batch-size", "4"], "HORNET_MAX_BATCH_SIZE", "16", "max_batch_size", 8, 16, 4),
    "bool": (
        ["--no-engine-spinning"],
        "HORNET_ENGINE_SPINNING",
        "true",
        "engine_spinning",
        False,
        True,
        False,
    ),
    "list": (
        ["--model-dir", "c", "--model-dir", "d"],
        "HORNET_MODEL_DIR",
        "a,b",
        "model_dir",
        Settings().model_dir,
        [Path("a"), Path("b")],
        [Path("c"), Path("d")],
    ),
    "Literal": (["--device", "cpu"], "HORNET_DEVICE", "cuda", "device", "cpu", "cuda", "cpu"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_default_when_neither_flag_nor_environment_gives_it(case: tuple[Any, ...]):
    _, _, _, setting, default, _, _ = case
    assert getattr(load_settings([]), setting) == default


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_environment_wins_over_the_default(case: tuple[Any, ...], monkeypatch):
    _, env, value, setting, _, from_env, _ = case
    monkeypatch.setenv(env, value)
    assert getattr(load_settings([]), setting) == from_env


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_flag_wins_over_the_environment(case: tuple[Any, ...], monkeypatch):
    flags, env, value, setting, _, _, from_flag = case
    monkeypatch.setenv(env, value)
    assert getattr(load_settings(flags), setting) == from_flag


def test_a_setting_no_flag_can_carry_is_refused_by_name():
    class Odd(BaseSettings):
        limits: dict[str, int] = {}

    with pytest.raises(TypeError, match=r"Odd\.limits"):
        add_settings_flags(argparse.ArgumentParser(), Odd)


def test_settings_flags_are_read_back_by_hornet_serve_as_the_same_settings(tmp_path):
    """A tool that starts the server (bench/loadgen.py) takes a subset of the flags with
    the server's defaults or its own, and writes them back as a command line: `hornet
    serve` reads that line as exactly the settings the tool holds, every kind of flag."""
    from service.flags import settings_flags

    names = ("max_batch_size", "max_delay_ms", "engine", "engine_spinning", "model_dir")
    tool = argparse.ArgumentParser()
    add_settings_flags(tool, Settings, only=names, defaults={"max_delay_ms": 2.5})
    assert {a.dest for a in tool._actions if a.option_strings} - {"help"} == set(names)
    assert "default 2.5" in " ".join(tool.format_help().split())
    for argv in ([], ["--engine", "openvino", "--engine-spinning", "--max-batch-size", "3"]):
        held = vars(tool.parse_args([*argv, "--model-dir", str(tmp_path)]))
        assert held["max_delay_ms"] == 2.5
        assert held["max_batch_size"] == (3 if argv else 8)
        assert held["model_dir"] == [str(tmp_path)]  # a list flag: unset unless given
        served = load_settings(settings_flags(Settings, held))
        assert {name: getattr(served, name) for name in names} == {
            **held,
            "model_dir": [tmp_path],
        }
    assert settings_flags(Settings, {"engine_spinning": False, "precision": None}) == [
        "--no-engine-spinning"
    ]


def test_settings_environment_is_read_back_by_hornet_serve_as_the_same_settings(
    tmp_path, monkeypatch
):
    """`hornet tune` prints its choice as HORNET_* variables too (for a container or a
    ConfigMap): `hornet serve` reads them as the very settings, every kind of field."""
    from service.flags import settings_environment

    values = {
        "engine": "openvino",
        "precision": "bf16",
        "instances": 3,
        "max_delay_ms": 2.5,
        "openvino_static_shapes": True,
        "engine_spinning": False,
        "model_dir": [tmp_path / "a", tmp_path / "b"],
        "max_pixels": None,
    }
    environment = settings_environment(Settings, values)
    assert "HORNET_MAX_PIXELS" not in environment
    assert environment["HORNET_ENGINE_SPINNING"] == "false"
    for name in [n for n in os.environ if n.startswith("HORNET_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    served = load_settings([])
    given = {name: value for name, value in values.items() if value is not None}
    assert {name: getattr(served, name) for name in given} == given
    with pytest.raises(ValueError, match="api_keys is a secret"):
        settings_environment(Settings, {"api_keys": ["k"]})
