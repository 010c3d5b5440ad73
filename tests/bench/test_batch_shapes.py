"""bench/batch_shapes.py on the CPU: one dynamic session against static batch sessions on
the same sequence of batch sizes, their outputs compared batch by batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "service" / "demo_bundles"


def _run(bundle: str, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "bench/batch_shapes.py", "--model-dir", str(DEMO / bundle),
        "--device", "cpu", *flags,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_both_engines_run_the_sequence_and_agree():
    done = _run("shapes_segment", "--max-batch-size", "4", "--batches", "6")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    sizes = [int(size) for size in lines[0].split("batches:")[1].split()]
    assert len(sizes) == 6 and all(1 <= size <= 4 for size in sizes)
    assert [line.split()[0] for line in lines[1:3]] == ["dynamic", "static"]
    assert "(4 sizes)" not in lines[2] and "(3 sizes)" in lines[2]  # 4, 2, 1
    assert "static / dynamic:" in lines[3]
    difference = float(lines[4].rsplit(":", 1)[1].split()[0])
    assert difference <= 1e-4


def test_a_graph_without_a_batch_axis_is_refused():
    done = _run("shapes_detect")
    assert done.returncode == 2
    assert "batch axis cannot be fixed" in done.stdout
