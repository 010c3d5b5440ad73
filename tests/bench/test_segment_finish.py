"""bench/segment_finish.py: the two ways of making a segmenter's mask run side by side on
the demo segmenter's logits and ADE20K-sized ones, and agree pixel for pixel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_both_ways_run_and_give_the_same_masks():
    command = [sys.executable, "bench/segment_finish.py", "--rounds", "1"]
    command += ["--largest-pixels", "1000000"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = done.stdout.splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["demo segmenter", "ADE20K 150 classes"]
    assert all(row.endswith("yes") for row in rows)
    assert "3024x4032" not in done.stdout  # past --largest-pixels
