"""bench/revisions.py: this tree's server and a base revision's, each from its own tree,
side by side; the base's worktree removed after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _worktrees() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout


def test_both_revisions_serve_and_the_worktree_goes():
    command = [
        sys.executable, "bench/revisions.py", "--base", "HEAD",
        "--rounds", "1", "--duration", "1", "--concurrency", "2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("    1 ")]
    assert sorted(row[1] for row in rows) == ["base", "this"]
    for row in rows:
        throughput, p50, p99, cpu = map(float, row[2:6])
        assert throughput > 0 and 0 < p50 <= p99 and cpu > 0
    assert done.stdout.splitlines()[-1].startswith("this / base req/s: ")
    assert "hornet-base-" not in _worktrees()
