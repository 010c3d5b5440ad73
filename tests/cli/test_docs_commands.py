"""The commands the docs tell users to type still exist as written: every `--flag` given
to a `hornet` command, `python -m service` or a `bench/` script in README.md, docs/ and
bench/*.md (code blocks and inline code) is one that command's own `--help` lists, and
every HORNET_* variable the docs and manifests set is a setting of the service (or a
variable the tests read). The tour's commands are run for real in
tests/service/test_tour.py."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "bench").glob("*.md")])
# A command's start: `hornet SUB` (perhaps .venv/bin/hornet), `python -m service`, or
# a script under bench/ named from the repository root.
COMMAND = re.compile(
    r"(?:^|(?<=[\s(`]))(?:\.venv/bin/)?"
    r"(hornet (?:export|list|serve|tune|verify)\b|python -m service\b|bench/[a-z_]+\.py\b)"
)
# Where a command's arguments end: a shell separator, a pipe into another command (a
# `|` between alternatives, `[--a | --b]`, is followed by a flag), a comment, a redirect.
END = re.compile(r";|&&|\|\||\|(?!\s*-)|\s#\s|>\s")
FLAG = re.compile(r"(?<![\w=-])--[a-z][a-z0-9-]*")
QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")  # another program's flags (--alt-flags "...")
# HORNET_* names that are no settings: the cross-check tests' own variables, and the
# prefix of the variables Kubernetes' service links would inject (why they are off).
NOT_SETTINGS = {
    "HORNET_MM_VENV": REPO / "tests/crosscheck/mm_env.py",
    "HORNET_MMDET_REFERENCE": REPO / "tests/crosscheck/test_mmdet_crosscheck.py",
    "HORNET_SERVE_": REPO / "k8s/base/deployment.yaml",
}


def snippets(text: str) -> Iterator[str]:
    """The lines of the fenced code blocks (continuations joined) and the inline code
    spans (which may wrap across lines of prose)."""
    fence = re.compile(r"```[\w-]*\n(.*?)```", flags=re.S)
    for block in fence.findall(text):
        yield from block.replace("\\\n", " ").splitlines()
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", fence.sub("", text)):
        yield span.replace("\n", " ")


def commands(line: str) -> Iterator[tuple[str, list[str]]]:
    """Each command in a line of code, with the flags given to it."""
    found = list(COMMAND.finditer(line))
    for index, match in enumerate(found):
        stop = found[index + 1].start() if index + 1 < len(found) else len(line)
        arguments = END.split(line[match.end() : stop])[0]
        name = "hornet serve" if match.group(1) == "python -m service" else match.group(1)
        yield name, FLAG.findall(QUOTED.sub(" ", arguments))


@cache
def accepted_flags(name: str) -> frozenset[str]:
    """The flags `name --help` lists; for a bench script whose imports are not in this
    environment (peer_litserve.py runs in the peers' one), the ones its source adds."""
    if name.startswith("hornet"):
        command = [sys.executable, "-c", "import hornet_cli; hornet_cli.main()"]
        command += [name.split()[1], "--help"]
    else:
        command = [sys.executable, name, "--help"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        source = (REPO / name).read_text()
        return frozenset(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", source))
    assert done.returncode == 0, f"{name} --help: {done.stderr[-1000:]}"
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", done.stdout))


def test_every_flag_in_the_docs_is_one_its_command_takes() -> None:
    unknown, checked = [], 0
    for doc in DOCS:
        for line in snippets(doc.read_text()):
            for name, flags in commands(line):
                for flag in flags:
                    checked += 1
                    if flag not in accepted_flags(name):
                        where = doc.relative_to(REPO)
                        unknown.append(f"{where}: {name} has no {flag}: {line[:160]}")
    assert checked > 300  # the docs give hundreds; a parser that finds none is broken
    assert not unknown, "\n".join(unknown)


def test_the_parser_finds_commands_and_their_flags_where_the_docs_write_them() -> None:
    fenced = "```sh\n.venv/bin/hornet export --variant v \\\n  --fp16 --out o\n```\n"
    inline = "run `python bench/peers.py --servers ours,ours-alt\n--alt-flags=--decode-nice 19`"
    piped = "`hornet serve --port 1 | grep --count x; python -m service --engine openvino`"
    found = [c for text in (fenced, inline, piped) for s in snippets(text) for c in commands(s)]
    assert found == [
        ("hornet export", ["--variant", "--fp16", "--out"]),
        ("bench/peers.py", ["--servers", "--alt-flags"]),
        ("hornet serve", ["--port"]),
        ("hornet serve", ["--engine"]),
    ]
    alternatives = "`bench/loadgen.py --model-dir B [--engine openvino | --precision int8]`"
    assert [c for s in snippets(alternatives) for c in commands(s)] == [
        ("bench/loadgen.py", ["--model-dir", "--engine", "--precision"])
    ]
    assert "--max-pixels" in accepted_flags("hornet serve")
    assert "--no-such-flag" not in accepted_flags("hornet serve")


def test_every_hornet_variable_the_docs_and_manifests_name_is_a_setting() -> None:
    settings = {f"HORNET_{name.upper()}" for name in Settings.model_fields}
    places = [*DOCS, *(REPO / "k8s").rglob("*.yaml"), *(REPO / "k8s").rglob("*.env")]
    places += [*(REPO / "docker").glob("*")]
    unknown = []
    for path in places:
        for name in set(re.findall(r"HORNET_[A-Z0-9_]+", path.read_text(errors="ignore"))):
            if name in settings:
                continue
            if name in NOT_SETTINGS and name in NOT_SETTINGS[name].read_text():
                continue
            unknown.append(f"{path.relative_to(REPO)}: {name}")
    assert not unknown, "\n".join(sorted(unknown))


def test_every_setting_is_in_the_configuration_table() -> None:
    table = (REPO / "docs" / "configuration.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    for name in Settings.model_fields:
        variable = f"HORNET_{name.upper()}"
        assert any(f"`{variable}`" in row for row in rows), f"{variable} has no row"
