"""bench/protocols.py on the demo classifier, a real server with a gRPC port started by
it: the four protocols agree on the image's class (checked by the script before any
timing, against the image route's answer) and each is timed with every request answered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = REPO / "service" / "demo_bundles" / "shapes_classify"

pytest.importorskip("tritonclient.grpc")


def test_protocols_agree_and_are_each_timed_side_by_side():
    command = [
        sys.executable, "bench/protocols.py", "--model-dir", str(CLASSIFIER),
        "--concurrency", "2", "--duration", "0.5", "--rounds", "2", "--engine-threads", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].endswith("by all 4")
    runs = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])]
    assert sorted((run[0], run[2]) for run in runs) == sorted(
        (r, p) for r in "12" for p in ("classify", "v2-rest", "v2-grpc", "v2-grpc-stream")
    )
    # Rounds alternate the order, so no protocol always runs first.
    assert [run[2] for run in runs[:4]] == [run[2] for run in runs[4:]][::-1]
    for run in runs:
        throughput, p50, p99 = (float(x) for x in run[3:6])
        assert throughput > 0 and 0 < p50 <= p99 and "failed" not in run
    ratios = [line for line in lines if "/ classify: img/s" in line]
    assert [line.split()[0] for line in ratios] == ["v2-rest", "v2-grpc", "v2-grpc-stream"]
