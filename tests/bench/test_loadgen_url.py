"""bench/loadgen.py against a running server (--url): its "vs engine" ratio divides by a
raw engine built from loadgen's own flags, so it must refuse a server running another
engine (a CUDA server measured against the CPU engine, say) and run when they agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.testing import running_server

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER = REPO / "service" / "demo_bundles" / "shapes_classify"


def _loadgen(url: str, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "bench/loadgen.py", "--model-dir", str(CLASSIFIER), "--url", url,
        "--concurrency", "1", "--duration", "0.5", "--engine-seconds", "0.05",
        "--engine-threads", "1", *flags,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_server_running_another_engine_is_refused_and_the_same_one_measured(tmp_path):
    flags = ["--model-dir", str(CLASSIFIER), "--engine", "openvino", "--engine-threads", "1"]
    with running_server(flags, log_path=tmp_path / "server.log") as server:
        other = _loadgen(server.url)
        same = _loadgen(server.url, "--engine", "openvino")
    assert other.returncode != 0
    assert "runs 'openvino" in other.stderr and "would run 'onnxruntime" in other.stderr
    assert "raw engine images/s" not in other.stdout
    assert same.returncode == 0, same.stderr[-2000:]
    assert "raw engine images/s" in same.stdout and "vs engine" in same.stdout
    # The server is not loadgen's process: its CPU is not measured, and says so (not nan).
    assert "server CPU not measured" in same.stdout and "nan" not in same.stdout
