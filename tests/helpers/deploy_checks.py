"""Readers for the deployment checks: Dockerfiles, kustomize renders, the CLI contract.

Loaders return either what they read or a string saying why they could not (a missing
tool or module); tests/deploy/conftest.py turns that string into a skip, so nothing
passes unchecked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
K8S_DIR = REPO / "k8s"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
# kustomizations that `kubectl apply -k` is pointed at.
RENDERS = (
    "base",
    "overlays/cpu",
    "overlays/cpu-openvino",
    "overlays/gpu",
    "examples/queue-depth-hpa",
    "examples/grpc",
    "examples/grafana",
    "examples/network-policy",
    "examples/tracing",
)
# Oldest supported (the preStop `sleep` action is on by default from 1.30) and newest known.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def verified_precisions(export_args: list[str]) -> set[str]:
    """The precisions `hornet export` with these arguments verifies and records in the
    bundle's manifest (`hornet serve` refuses any other)."""
    verified = {"fp32"}
    verified |= {export_args[i + 1] for i, a in enumerate(export_args) if a == "--verify-precision"}
    verified |= {"fp16"} if "--fp16" in export_args else set()
    verified |= {"int8"} if "--int8" in export_args else set()
    return verified


# --- Dockerfiles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    stage: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD/RUN, or None for shell form."""
        try:
            parsed = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, list) else None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined, comments dropped, stage names tracked."""
    instructions: list[Instruction] = []
    stage, buffer, start = "", "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        keyword, _, value = (buffer + line).partition(" ")
        buffer = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            words = value.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else words[0]
        instructions.append(Instruction(keyword, value.strip(), stage, start))
    return instructions


def stage_names(instructions: list[Instruction]) -> list[str]:
    return [i.stage for i in instructions if i.keyword == "FROM"]


def entrypoint_and_cmd(instructions: list[Instruction], stage: str) -> tuple[list, list] | None:
    """ENTRYPOINT and CMD of `stage` (the last of each wins), or None if either is shell form."""
    found: dict[str, list[str]] = {"ENTRYPOINT": [], "CMD": []}
    for instruction in instructions:
        if instruction.stage == stage and instruction.keyword in found:
            argv = instruction.exec_form()
            if argv is None:
                return None
            found[instruction.keyword] = argv
    return found["ENTRYPOINT"], found["CMD"]


def final_command(instructions: list[Instruction], stage: str) -> list[str] | None:
    """What the container runs with no arguments: ENTRYPOINT + CMD, exec form only."""
    parts = entrypoint_and_cmd(instructions, stage)
    return None if parts is None else parts[0] + parts[1]


def dockerignore_patterns(dockerfile: Path) -> list[str]:
    """BuildKit uses <Dockerfile>.dockerignore next to the Dockerfile before a root one."""
    for candidate in (Path(f"{dockerfile}.dockerignore"), REPO / ".dockerignore"):
        if candidate.exists():
            lines = candidate.read_text().splitlines()
            return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return []


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def is_dockerignored(relative_path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent directory counts."""
    parts = relative_path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


# --- The CLI contract ----------------------------------------------------------------------


def project_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})


@dataclass
class Cli:
    """The `hornet` command: the argparse parser each of its subcommands parses with."""

    program: str
    parsers: dict[str, argparse.ArgumentParser]

    @property
    def subcommands(self) -> set[str]:
        return set(self.parsers)

    def error(self, argv: list[str]) -> str | None:
        """Why `argv` (after the program name) would be refused, or None if accepted."""
        if not argv or argv[0] not in self.parsers:
            return f"unknown subcommand in {argv}; the CLI has {sorted(self.subcommands)}"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                self.parsers[argv[0]].parse_args(argv[1:])
            except SystemExit as exit_:
                if exit_.code not in (0, None):
                    return stderr.getvalue().strip() or f"exit {exit_.code}"
        return None


@cache
def load_cli() -> Cli | str:
    """The CLI, or the reason it cannot be inspected yet (the caller skips with it).

    The `[project.scripts]` program's module gives its subcommands' parsers through its
    public `subcommand_parsers()`.
    """
    scripts = project_scripts()
    if not scripts:
        return "pyproject.toml has no [project.scripts]"
    program, target = next(iter(scripts.items()))
    module_name = target.partition(":")[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as missing:
        if missing.name and module_name.startswith(missing.name):
            return f"{module_name} (the `{program}` entry point) does not exist yet"
        raise
    subcommand_parsers = getattr(module, "subcommand_parsers", None)
    if subcommand_parsers is None:
        return f"{module_name} has no subcommand_parsers()"
    parsers = subcommand_parsers()
    if not parsers:
        return f"`{program}` has no subcommands (are its entry points installed?)"
    return Cli(program, parsers)


def hornet_argv(argv: list[str], cli: Cli) -> list[str] | None:
    """The arguments after the program name when `argv` runs the CLI, else None."""
    names = {cli.program, f"/opt/venv/bin/{cli.program}"}
    return argv[1:] if argv and argv[0] in names else None


def shell_cli_calls(command: str, program: str) -> list[list[str]]:
    """Arguments of each `program ...` call in a shell-form RUN, redirections dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    calls, words = [], []
    for token in [*lexer, ";"]:
        if token not in ("&&", "||", ";", "|", "&"):
            words.append(token)
            continue
        if words and words[0] == program:
            redirect = [i for i, w in enumerate(words) if w[0] in "<>"]
            calls.append(words[1 : redirect[0] if redirect else None])
        words = []
    return calls


# --- Settings ------------------------------------------------------------------------------


@cache
def load_settings_class() -> type | str:
    """`service.settings.Settings` (pydantic-settings), or why it cannot be loaded yet."""
    try:
        module = importlib.import_module("service.settings")
    except ModuleNotFoundError as missing:
        if missing.name in ("service", "service.settings"):
            return "service/settings.py (service.settings.Settings) does not exist yet"
        raise
    return getattr(module, "Settings", None) or "service.settings has no Settings class yet"


def setting_env_names(settings: type) -> set[str]:
    """Environment variable names `hornet serve` reads (pydantic-settings' view)."""
    prefix = settings.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in settings.model_fields.items():
        names.add((prefix + field_name).upper())
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                names.add(alias.upper())
    return names


# --- Kubernetes ----------------------------------------------------------------------------


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


@cache
def render(kustomization: str) -> list[dict] | str:
    """The objects `kubectl apply -k k8s/<kustomization>` would send, or why not."""
    command = _kustomize_command()
    if command is None:
        return "neither kustomize nor kubectl (with kustomize) is on PATH"
    result = subprocess.run(
        [*command, str(K8S_DIR / kustomization)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize failed on k8s/{kustomization}:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: list[dict], kind: str, name_prefix: str = "") -> dict:
    matches = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name_prefix)
    ]
    assert len(matches) == 1, f"expected one {kind} {name_prefix!r}, got {len(matches)}"
    return matches[0]


def read_env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs
