"""bench/soak.py for one minute against the demo models: mixed traffic (valid images on
every route, bad inputs, clients that hang up, overload bursts) answered without a 5xx
or a wrong answer, every kind of request sent, and the server ready and exiting cleanly
afterwards. The ten-minute figures are in bench/SOAK.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DURATION_S = 60


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("soak")
    command = [
        sys.executable, "bench/soak.py", "--duration", str(DURATION_S),
        "--json", str(out / "soak.json"), "--server-log", str(out / "server.log"),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=DURATION_S + 300
    )
    print(result.stdout, result.stderr)  # shown by pytest when a test below fails
    if not (out / "soak.json").is_file():
        pytest.fail(f"bench/soak.py wrote no report ({result.returncode}): {result.stderr[-3000:]}")
    return json.loads((out / "soak.json").read_text())


def test_no_answer_is_a_5xx_other_than_overloaded(report: dict) -> None:
    assert report["five_xx"] == 0, report["five_xx_examples"]


def test_the_server_records_no_5xx_other_than_overloaded(report: dict) -> None:
    assert report["server_five_xx"] == {}, report["error_log_summary"]


def test_every_answer_equals_its_single_request_reference(report: dict) -> None:
    assert report["wrong_answers"] == 0, report["wrong_examples"]


def test_bad_inputs_get_a_4xx_with_an_error_and_no_connection_is_dropped(report: dict) -> None:
    assert report["unexpected"] == 0, report["unexpected_examples"]


def sent(report: dict, kind: str) -> int:
    """Requests of `kind` ('burst' counts every 'burst/...' kind), whatever their status."""
    return sum(
        sum(statuses.values())
        for name, statuses in report["requests"].items()
        if name == kind or name.startswith(f"{kind}/")
    )


def test_every_kind_of_request_was_sent(report: dict) -> None:
    counts = {kind: sent(report, kind) for kind in report["kinds"]}
    assert all(counts.values()), counts


def test_no_request_is_left_in_flight(report: dict) -> None:
    assert report["in_flight_at_end"] == 0


def test_the_server_is_still_ready_and_exits_cleanly_on_sigterm(report: dict) -> None:
    assert report["ready_at_end"]
    assert report["exit_status"] == 0
