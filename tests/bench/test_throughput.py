"""bench/throughput.py: engines run side by side as --instances, and the script prints
every engine and batch asked for, with the other engines' ratios to ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.helpers.bench import bench_module

REPO = Path(__file__).resolve().parents[2]


def test_instances_run_at_the_same_time():
    # Two "engines" that each take 20 ms (sleeping, so they overlap as engines that
    # release the GIL do): side by side they make about twice the calls of one alone.
    def engine(_: np.ndarray) -> None:
        time.sleep(0.02)

    x = np.zeros(1)
    with bench_module("throughput") as throughput:
        alone, alone_s = throughput.timed_side_by_side((engine,), x, 0.3)
        both, both_s = throughput.timed_side_by_side((engine, engine), x, 0.3)
    assert 0.3 <= alone_s < 0.5 and 0.3 <= both_s < 0.5
    assert 10 <= len(alone) <= 16
    assert len(both) >= 1.7 * len(alone)
    assert all(0.019 < latency < 0.2 for latency in alone + both)


def test_at_least_one_call_each_however_short_the_round():
    calls = []
    runs = tuple((lambda _, i=i: calls.append(i)) for i in range(3))
    with bench_module("throughput") as throughput:
        latencies, _ = throughput.timed_side_by_side(runs, np.zeros(1), 0.0)
    assert len(latencies) >= 3 and set(calls) == {0, 1, 2}


def test_the_script_runs_two_instances_of_each_engine():
    command = [sys.executable, "bench/throughput.py", "service/demo_bundles/shapes_classify"]
    command += ["--engines", "onnxruntime,openvino", "--instances", "2", "--threads", "1"]
    command += ["--rounds", "1", "--seconds", "0.2", "--batch", "1,2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "2 instance(s) of engine threads=1" in out.splitlines()[0]
    rows = [row.split() for row in out.splitlines() if row.startswith("shapes_classify ")]
    engines = {(row[1], row[-4]) for row in rows}
    assert engines == {(kind, batch) for kind in ("onnx/fp32", "openvino/fp32") for batch in "12"}
    assert all(float(row[-3]) > 0 for row in rows)
    assert "shapes_classify openvino/fp32" in out.split("ONNX Runtime fp32 of the same bundle")[1]
