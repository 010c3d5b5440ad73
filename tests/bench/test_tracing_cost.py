"""bench/tracing_cost.py: both servers run, every traced request reaches the receiver as
its five spans, and the ratios are printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "service" / "demo_bundles" / "shapes_classify"


def test_both_servers_run_and_every_traced_request_is_exported():
    command = [
        sys.executable, "bench/tracing_cost.py", "--model-dir", str(DEMO),
        "--rounds", "1", "--duration", "1", "--concurrency", "2",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("    1 ")]
    assert sorted(row[1] for row in rows) == ["plain", "traced"]
    for row in rows:
        throughput, p50, p99, cpu = map(float, row[2:6])
        assert throughput > 0 and 0 < p50 <= p99 and cpu > 0
    assert "traced / plain: req/s " in done.stdout
    spans = re.search(r"spans received: (\d+) for (\d+) traced requests", done.stdout)
    assert spans and int(spans[2]) > 0 and int(spans[1]) == 5 * int(spans[2])
