"""A real server's log, read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def json_lines(log_path: Path) -> list[dict]:
    """Every line of the server's log, parsed; the test fails naming the first line that
    is not JSON (a library writing plain text to standard error beside the log)."""
    lines = []
    for line in log_path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a line of the server's log is not JSON: {line[:300]!r}")
    return lines
