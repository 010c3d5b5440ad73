"""bench/priority.py: both modes run beside the bulk clients and the ratios are printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "service" / "demo_bundles" / "shapes_classify"


def test_both_modes_run_and_compare():
    command = [
        sys.executable, "bench/priority.py", "--model-dir", str(DEMO),
        "--rounds", "1", "--duration", "1", "--bulk", "3",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--priority-levels 2" in done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("    1 ")]
    assert sorted(row[1] for row in rows) == ["fifo", "priority"]
    for row in rows:
        inter, p50, p99, bulk, errors = map(float, row[2:])
        assert inter > 0 and bulk > 0 and 0 < p50 <= p99 and errors == 0
    ratios = done.stdout.splitlines()[-1]
    assert ratios.startswith("priority / fifo: interactive p50 ")
