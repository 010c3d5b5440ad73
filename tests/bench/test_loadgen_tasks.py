"""bench/loadgen.py on each task's demo bundle, a real server started by it: requests go
to the task's route and are answered, and the raw reference runs the task's items (a
segmenter's tiles in batches up to the max, a detector's one image per call)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "service" / "demo_bundles"


@pytest.mark.parametrize(
    ("bundle", "task", "sizes"),
    [("shapes_detect", "detect", {1}), ("shapes_segment", "segment", {1, 2})],
)
def test_loadgen_measures_the_bundles_task(bundle, task, sizes):
    command = [
        sys.executable, "bench/loadgen.py", "--model-dir", str(DEMO / bundle),
        "--concurrency", "2", "--duration", "120", "--requests", "6", "--engine-seconds", "0.05",
        "--max-batch-size", "2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert f"({task})" in lines[0]
    raw = next(line for line in lines if line.startswith("raw engine images/s"))
    keys = [pair.split("=")[0] for pair in raw.split(":", 1)[1].split("(best")[0].split()]
    assert {int(re.match(r"b(\d+)", key)[1]) for key in keys} == sizes
    assert "b1+spin" in keys
    level = next(line for line in lines if line.split()[:1] == ["2"])
    ok, errors = level.split()[1:3]
    assert int(ok) >= 6 and errors == "-"
    # The server's CPU per image, then by its threads' names (service.thread_names): the
    # parts are the same process's threads' run times, read within the span of its ticks
    # (the whole read first at the start, last at the end), so they add up to no more
    # than the whole, but for its rounding: /proc rounds its user and its system time
    # each down to a tick (10 ms), so the whole can read up to two ticks short.
    where = re.search(
        r"server ([\d.]+) ms/img \(engine ([\d.]+), decode ([\d.]+), loop ([\d.]+), "
        r"other ([\d.]+)\)",
        level,
    )
    assert where, level
    total, *parts = map(float, where.groups())
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    assert total > 0 and sum(parts) <= total + 2 * tick_ms / int(ok) + 0.25
    # The ceiling is the raw engine's CPU per image over that plus everything else's.
    beside = sum(parts[1:]) + float(re.search(r"client ([\d.]+),", level)[1])
    raw_ms = float(re.search(r"raw engine ([\d.]+);", level)[1])
    ceiling = float(re.search(r"CPU-bound ceiling ([\d.]+)", level)[1])
    assert 0 < ceiling < 1
    # from the printed figures, each rounded to 0.1 ms (five of them beside the engine)
    low = (raw_ms - 0.05) / (raw_ms - 0.05 + beside + 0.25)
    high = (raw_ms + 0.05) / (raw_ms + 0.05 + max(beside - 0.25, 0.0))
    assert low - 0.0005 <= ceiling <= high + 0.0005, (low, ceiling, high, level)
    # A request's wall time in the server by stage (its statistics): all there, and the
    # engine's share no more than the client's whole round trip (p99 bounds every one).
    stages = re.search(
        r"wall ms in the server: input ([\d.]+), queue ([\d.]+), engine ([\d.]+), "
        r"answer ([\d.]+)",
        level,
    )
    assert stages, level
    p99 = float(level.split()[6])
    assert 0 < float(stages[3]) and sum(map(float, stages.groups())) <= p99 + 0.2
