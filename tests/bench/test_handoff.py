"""bench/handoff.py: both hand-off orders run on both cases and the ratio is printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_both_ways_run_on_both_cases():
    command = [sys.executable, "bench/handoff.py", "--rounds", "1", "--seconds", "0.5"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = done.stdout.splitlines()[1:]
    assert [row[:8] for row in rows] == ["GPU-like"] * 3 + ["CPU-like"] * 3
    for answers, dispatch, ratio in (rows[0:3], rows[3:6]):
        assert "answers first" in answers and "dispatch first" in dispatch
        rates = [float(row.split()[-2]) for row in (answers, dispatch)]
        assert all(rate > 0 for rate in rates)
        assert float(ratio.split()[-1].rstrip("x")) > 0
