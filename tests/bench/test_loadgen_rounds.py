"""bench/loadgen.py's rounds: the raw engine first in odd rounds, the server first in even
ones (a host's speed drifts within a run), and a two-round run on the demo classifier, a
real server started by it, with each round's figures and the summary over both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.bench import bench_module

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = REPO / "service" / "demo_bundles" / "shapes_classify"


def test_the_rounds_alternate_which_step_comes_first():
    with bench_module("loadgen") as loadgen:
        orders = [loadgen.round_order(("raw", "load"), r) for r in range(1, 5)]
    raw_first, load_first = ["raw", "load"], ["load", "raw"]
    assert orders == [raw_first, load_first, raw_first, load_first]


def test_two_rounds_each_measure_the_engine_and_the_server():
    command = [
        sys.executable, "bench/loadgen.py", "--model-dir", str(CLASSIFIER),
        "--concurrency", "2", "--duration", "120", "--requests", "6", "--engine-seconds", "0.05",
        "--max-batch-size", "2", "--rounds", "2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1", "round 2 (the server first)"]
    levels = [line for line in lines if line.split()[:1] == ["2"]]
    assert len(levels) == 2
    for level in levels:
        ok, errors = level.split()[1:3]
        assert int(ok) >= 6 and errors == "-"
    assert any("median" in line for line in lines[lines.index(rounds[1]) :]), done.stdout
