"""The console examples of docs/tour.md and README.md, typed as a user would: every `$`
command run by bash (curl and all) against a real server of the demo bundles, in the
order shown, and its output compared with the one printed under it. Strings the docs
cut short (ending in `…`) must begin the real ones, a list abridged with `, …]` must
begin the real list, and numbers must agree to 1e-4 (engines' last digits differ
between CPUs); everything else must be equal."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.testing import running_server

REPO = Path(__file__).resolve().parents[2]
DOC_URL = "http://127.0.0.1:8000"
ELLIPSIS = "…"
API_KEY = "tour-key-0123456789abcdef"
ABRIDGED = "(the docs abridge this list here)"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the docs use curl")


def console_examples(path: Path) -> list[tuple[str, list[str]]]:
    """Each `$` command of the file's ```console blocks, with the lines printed under
    it (up to the next command or blank line)."""
    examples: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                examples.append((line[2:], []))
            elif line.strip() and examples:
                examples[-1][1].append(line)
    return examples


def _parse_doc_json(text: str):
    """JSON as the docs print it: `, …]` ends a list abridged there."""
    return json.loads(text.replace(f", {ELLIPSIS}]", f', "{ABRIDGED}"]'))


def _agrees(expected, actual, where: str = "$") -> Iterator[str]:
    """Where `actual` differs from the docs' `expected` (empty: it agrees)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(expected) != set(actual):
            yield f"{where}: keys {sorted(expected)} in the docs, got {actual!r:.200}"
            return
        for key, value in expected.items():
            yield from _agrees(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        abridged = bool(expected) and expected[-1] == ABRIDGED
        shown = expected[:-1] if abridged else expected
        if not isinstance(actual, list) or (
            len(actual) < len(shown) if abridged else len(actual) != len(shown)
        ):
            yield f"{where}: {len(shown)} items in the docs, got {actual!r:.200}"
            return
        for index, value in enumerate(shown):
            yield from _agrees(value, actual[index], f"{where}[{index}]")
    elif isinstance(expected, str) and expected.endswith(ELLIPSIS):
        if not (isinstance(actual, str) and actual.startswith(expected[: -len(ELLIPSIS)])):
            yield f"{where}: the docs' {expected!r:.80} does not begin {actual!r:.80}"
    elif isinstance(expected, float) and not isinstance(actual, bool):
        if not (
            isinstance(actual, int | float)
            and math.isclose(expected, actual, rel_tol=1e-4, abs_tol=1e-6)
        ):
            yield f"{where}: {expected} in the docs, got {actual!r}"
    elif expected != actual or type(expected) is not type(actual):
        yield f"{where}: {expected!r:.120} in the docs, got {actual!r:.120}"


def _with_code(line: str) -> tuple[str, str]:
    """A line of JSON, and the HTTP status curl's `-w ' %{http_code}'` put after it."""
    code = re.search(r"(?<=}) (\d{3})$", line)
    return (line[: code.start()], code.group(1)) if code else (line, "")


# The test's own readiness probes before the models are loaded (as many as loading takes).
PROBES_BEFORE_READY = re.compile(r'^hornet_requests_total\{route="/readyz",status="503"\} ')


def differences(expected: list[str], actual: list[str]) -> list[str]:
    """Line by line: JSON (optionally followed by curl's ` %{http_code}`) compared as
    above, other lines (metrics) compared as text."""
    actual = [line for line in actual if not PROBES_BEFORE_READY.match(line)]
    if len(expected) != len(actual):
        return [f"{len(expected)} lines in the docs, {len(actual)} printed: {actual!r:.600}"]
    found: list[str] = []
    for want, got in zip(expected, actual, strict=True):
        if not want.startswith("{"):
            if want != got:
                found.append(f"{want!r} in the docs, got {got!r}")
            continue
        (want_json, want_code), (got_json, got_code) = _with_code(want), _with_code(got)
        if want_code != got_code:
            found.append(f"HTTP {want_code or '(none)'} in the docs, got {got_code or '(none)'}")
        try:
            actual_json = json.loads(got_json)
        except json.JSONDecodeError:
            found.append(f"not JSON: {got!r:.300}")
            continue
        found += list(_agrees(_parse_doc_json(want_json), actual_json))
    return found


def run_example(command: str, cwd: Path, base_url: str, keyed_url: str) -> list[str]:
    """The command as a user types it, against our servers: the one with API keys for
    the example that says it needs one."""
    url = keyed_url if "Authorization: Bearer" in command else base_url
    command = command.replace(DOC_URL, url).replace(".venv/bin/python", sys.executable)
    done = subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    return [line for line in done.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """The demo bundles as `make serve` serves them, and a second server with an API key
    (the tour's 401 example)."""
    logs = tmp_path_factory.mktemp("tour-logs")
    plain = running_server(log_path=logs / "server.log", inherit_settings=False)
    keyed = running_server(
        ["--api-key", API_KEY],
        log_path=logs / "keyed.log",
        inherit_settings=False,
        ready_path="/healthz",
    )
    with plain as server, keyed as keyed_server:
        yield server.url, keyed_server.url


@pytest.mark.parametrize("doc", ["docs/tour.md", "README.md"])
def test_the_console_examples_print_what_the_docs_show(doc, servers, tmp_path) -> None:
    examples = console_examples(REPO / doc)
    assert len(examples) >= 7
    base_url, keyed_url = servers
    problems = []
    for command, expected in examples:
        printed = run_example(command, tmp_path, base_url, keyed_url)
        if expected:
            problems += [f"{command}\n    {p}" for p in differences(expected, printed)]
        elif command.startswith("curl"):  # shown without its answer: a good one
            answer = json.loads("".join(printed))
            assert "error" not in answer, (command, answer)
    assert not problems, "\n".join(problems)
