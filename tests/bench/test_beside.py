"""bench/beside.py: the engines run alone and beside a real neighbour server fed open
loop, every neighbour request is answered at its rate, and the ratios are printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "service" / "demo_bundles" / "shapes_classify"
NUMBER = r"([0-9.]+)"


def test_engines_alone_and_beside_a_neighbour_at_its_rate():
    command = [
        sys.executable, "bench/beside.py", "--model-dir", str(DEMO), "--rounds", "2",
        "--seconds", "1", "--rate", "20", "--instances", "1", "--engine-threads", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    # a neighbour that missed its rate or failed a request says so: it must not here
    assert "did not keep the rate" not in done.stdout, done.stdout
    rounds = re.findall(
        rf"round \d: alone {NUMBER} img/s, {NUMBER} CPU ms/img; beside {NUMBER} img/s, "
        rf"{NUMBER} CPU ms/img; the neighbour: server {NUMBER} \+ client {NUMBER} CPU "
        rf"ms/request, {NUMBER} CPUs, (\d+) requests answered",
        done.stdout,
    )
    assert len(rounds) == 2, done.stdout
    for figures in rounds:
        alone, alone_ms, beside, beside_ms, server_ms, client_ms, cpus = map(float, figures[:7])
        assert alone > 0 and beside > 0 and alone_ms > 0 and beside_ms > 0
        assert server_ms > 0 and client_ms > 0 and 0 < cpus < 2
        # open loop at 20/s over the engines' second and a second either side of it
        assert int(figures[7]) == 60
    assert re.search(r"over 2 rounds, beside / alone: images/s [0-9.]+ \(", done.stdout)
