"""bench/peers.py's arguments and rounds: a previous run's folder given as --work
(TorchServe's model store and pid file in it) is refused before any server starts, with
the reason, and a new or empty one is taken; the servers' order is reversed every other
round."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.bench import bench_module

REPO = Path(__file__).resolve().parents[2]


def _parse(*flags: str) -> subprocess.CompletedProcess:
    code = "import sys; sys.path.insert(0, 'bench'); import peers; peers.parse_args(sys.argv[1:])"
    command = [sys.executable, "-c", code, "--servers", "ours", *flags]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_used_work_folder_is_refused_and_a_new_or_empty_one_taken(tmp_path):
    used = tmp_path / "used"
    (used / "torchserve" / "tmp").mkdir(parents=True)
    refused = _parse("--work", str(used))
    assert refused.returncode == 2
    assert f"--work {used} is not empty" in refused.stderr
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new"):
        taken = _parse("--work", str(folder))
        assert taken.returncode == 0, taken.stderr


def test_a_file_given_as_work_folder_is_refused_with_one_line(tmp_path):
    given = tmp_path / "notes.txt"
    given.write_text("x")
    refused = _parse("--work", str(given))
    assert refused.returncode == 2
    assert f"--work {given} is a file" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_servers_order_is_reversed_every_other_round():
    servers = ["ours", "litserve", "torchserve"]
    # peers.py imports loadgen as a top-level module: loaded first, it is found there
    with bench_module("loadgen"), bench_module("peers") as peers:
        orders = [peers.round_order(servers, r) for r in range(1, 5)]
    assert orders[0] == orders[2] == servers
    assert orders[1] == orders[3] == servers[::-1]
    # over two rounds each server runs first and last once, or in the middle twice
    for server in servers:
        positions = sorted(order.index(server) for order in orders[:2])
        assert positions in ([0, 2], [1, 1])
