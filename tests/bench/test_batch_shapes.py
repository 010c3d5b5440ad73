"""bench/batch_shapes.py on the CPU: one dynamic session against static batch sessions on
the same sequence of batch sizes, or against a session per shape on a detector's changing
image shapes; their outputs compared batch by batch."""

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


def test_the_detector_runs_changing_image_shapes_on_a_session_per_shape():
    """No batch axis: single images in three shapes fitted to the demo's scale (256, 192),
    one dynamic session against a session per shape, the same detections from both."""
    done = _run("shapes_detect", "--batches", "7")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    shapes = lines[0].split("images:")[1].split()
    assert len(shapes) == 7 and set(shapes) <= {"192x256", "256x192", "144x256"}
    assert [line.split()[0] for line in lines[1:3]] == ["dynamic", "shapes"]
    assert all("(3 shapes)" in line for line in lines[1:3])
    assert "shapes / dynamic:" in lines[3]
    assert float(lines[4].rsplit(":", 1)[1].split()[0]) <= 1e-4


def test_image_shapes_follow_the_scale_and_the_aspect_ratios():
    from tests.helpers.bench import bench_module

    with bench_module("batch_shapes") as module:
        shapes = module.image_shapes((1333, 800), 5)
        assert shapes == [(800, 1333), (1333, 800), (750, 1333), (1333, 750), (800, 800)]
        assert module.image_shapes(None, 2) == [(192, 256), (256, 192)]
