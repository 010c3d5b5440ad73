"""`hornet serve` as a real process: uvicorn over a socket, flags and environment,
JSON logs with request ids, a clean exit on SIGTERM; and the settings it reads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service import cli
from service import settings as settings_module
from service.settings import Settings
from service.testing import RunningServer, free_port, running_server
from tests.helpers.images import encode, upload
from tests.helpers.memory import memory_of
from tests.helpers.raw_http import connect, read_one_answer, read_until_closed, send
from tests.helpers.references import assert_official_scores


@pytest.fixture
def server(classifier_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """max_batch_size from the environment, max_delay_ms from a flag."""
    flags = ["--model-dir", str(classifier_dir), "--max-delay-ms", "20"]
    env = {"HORNET_MAX_BATCH_SIZE": "4", "HORNET_ENGINE_THREADS": "1"}
    with running_server(flags, log_path=tmp_path / "server.log", env=env) as server:
        yield server


def test_real_server_answers_over_http_and_exits_cleanly_on_sigterm(server, photos) -> None:
    base_url, process, log_path = server
    images = [encode(photos[name]) for name in ("chelsea", "astronaut")]
    with httpx.Client(base_url=base_url, timeout=30) as client:
        response = client.post(
            "/classify", params={"top_k": 10}, files=upload(*images),
            headers={"x-request-id": "from-the-test"},
        )  # fmt: skip
        models = client.get("/v1/models").json()["models"]
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "from-the-test"
    for name, result in zip(("chelsea", "astronaut"), response.json()["results"], strict=True):
        assert_official_scores(result, photos[name])
    assert models[0]["batching"]["max_batch_size"] == 4  # from the environment
    assert models[0]["batching"]["max_delay_ms"] == 20.0  # from the flag
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0  # a graceful shutdown is a normal exit, not death by SIGTERM
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "from-the-test" for line in lines)
    messages = [line["message"] for line in lines]
    assert "models ready" in messages and "shut down" in messages


@pytest.fixture
def parser_server(http_parser, classifier_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """The classifier behind `http_parser`."""
    flags = ["--model-dir", str(classifier_dir), "--http-parser", http_parser]
    with running_server(flags, log_path=tmp_path / "server.log") as server:
        yield server


def _exchange(base_url: str, data: bytes) -> bytes:
    """Send `data` on a fresh connection, as far as the server reads it; everything the
    server answers until it closes the connection (or answers nothing more for 30 s)."""
    with connect(base_url) as connection:
        for start in range(0, len(data), 1 << 14):
            if not send(connection, data[start : start + (1 << 14)]):
                break  # the server closed the connection before the data was all sent
        return read_until_closed(connection)


def _assert_still_serving(base_url: str) -> None:
    fine = _exchange(base_url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert fine.startswith(b"HTTP/1.1 200"), fine[:200]


@pytest.mark.parametrize("part", ["url", "header"])
def test_a_request_head_over_the_bound_is_refused_and_others_still_served(
    http_parser, parser_server, part
) -> None:
    """An endless URL or header line is cut off at 16 KiB by either parser, long before
    it is all sent (uvicorn's own httptools protocol would read and buffer it all and
    answer 200), and the server goes on serving."""
    filler = b"a" * (32 << 20)
    if part == "url":
        head = b"GET /healthz?" + filler + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    else:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + filler + b"\r\n\r\n"
    answer = _exchange(parser_server.url, head)
    if http_parser == "httptools":
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert json.loads(body)["error"] == "request_head_too_large"
    else:
        assert answer.startswith(b"HTTP/1.1 400") or answer == b"", answer[:200]
    _assert_still_serving(parser_server.url)


def test_heads_under_the_bound_bodies_and_pipelined_requests_in_one_write_are_served(
    parser_server, photos
) -> None:
    """The bound is on the head only: a 15 KiB head followed in the same write by a body
    far over 16 KiB is served, as are two requests sent in one write."""
    photo = encode(photos["chelsea"])
    assert len(photo) > 4 * 16384
    request = httpx.Request(
        "POST", f"{parser_server.url}/classify?top_k=10", files=upload(photo),
        headers={"X-Filler": "a" * 15000, "Connection": "close"},
    )  # fmt: skip
    body = request.read()
    head = "POST /classify?top_k=10 HTTP/1.1\r\nHost: x\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in request.headers.items() if name != "host"
    )
    answer = _exchange(parser_server.url, head.encode() + b"\r\n" + body)
    status, _, payload = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), answer[:300]
    [result] = json.loads(payload)["results"]
    assert_official_scores(result, photos["chelsea"])

    two = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answers = _exchange(parser_server.url, two)
    assert answers.count(b"HTTP/1.1 200 OK") == 2, answers[:300]
    assert b'"models"' in answers


def test_pipelined_requests_sent_without_reading_cost_bounded_memory(parser_server) -> None:
    """20 connections each write 1 MiB of pipelined GETs (30000 requests) and read
    nothing: h11 parses one request at a time; httptools would parse them all, and
    uvicorn would queue a request object for each (about 300 MiB here, measured with
    uvicorn's own httptools protocol), but ours stops at 16 queued per connection. The
    server's memory stays within 32 MiB of where it was, and it serves the next client."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = request * ((1 << 20) // len(request))
    before = memory_of(parser_server.process.pid)["VmRSS"]
    connections = []
    try:
        for _ in range(20):
            connection = connect(parser_server.url)
            connection.setblocking(False)
            with contextlib.suppress(BlockingIOError, ConnectionResetError, BrokenPipeError):
                connection.send(flood)
            connections.append(connection)
        time.sleep(3)
        grown = (memory_of(parser_server.process.pid)["VmRSS"] - before) / 2**20
    finally:
        for connection in connections:
            connection.close()
    assert grown < 32, f"the server grew by {grown:.0f} MiB"
    _assert_still_serving(parser_server.url)


def test_deep_pipelining_is_refused_with_429_by_httptools_and_served_by_h11(
    http_parser, parser_server
) -> None:
    """40 requests in one write: h11 answers them all in order; the httptools protocol
    answers 429 with a JSON body once more than 16 wait behind the one being answered."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers = _exchange(parser_server.url, request * 39 + last)
    if http_parser == "h11":
        assert answers.count(b"HTTP/1.1 200 OK") == 40
    else:
        assert b"HTTP/1.1 429 Too Many Requests" in answers, answers[-300:]
        assert b'"error": "too_many_pipelined_requests"' in answers
        assert answers.count(b"HTTP/1.1 200 OK") <= 17


@pytest.mark.parametrize(
    "data",
    [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 client without negotiation
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100),  # TLS on the plain port
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # both lengths: a smuggling attempt
    ],
    ids=["http2-preface", "tls", "content-length-and-chunked"],
)
def test_what_the_httptools_parser_refuses_gets_a_json_400(classifier_dir, tmp_path, data) -> None:
    flags = ["--model-dir", str(classifier_dir), "--http-parser", "httptools"]
    with running_server(flags, log_path=tmp_path / "server.log") as server:
        status, _, body = _exchange(server.url, data).partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 400 "), status
        assert json.loads(body)["error"] == "bad_http_request"
        _assert_still_serving(server.url)


def test_flags_override_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HORNET_MAX_QUEUE_SIZE", "7")
    monkeypatch.setenv("HORNET_PORT", "9000")
    monkeypatch.setenv("HORNET_MODEL_DIR", f"{tmp_path}/a,{tmp_path}/b")
    settings = cli.load_settings(["--port", "9100", "--instances", "3"])
    assert settings.max_queue_size == 7
    assert (settings.port, settings.instances) == (9100, 3)
    assert settings.model_dir == [tmp_path / "a", tmp_path / "b"]
    assert not settings.uses_demo_bundles


def test_invalid_flag_values_exit_with_status_2(capsys) -> None:
    assert cli.serve_main(["--max-batch-size", "0", "--model-dir", "x"]) == 2
    assert capsys.readouterr().err == (
        "hornet serve: invalid setting: --max-batch-size (HORNET_MAX_BATCH_SIZE): input should "
        "be greater than or equal to 1, given '0'\n"
    )


def test_without_model_dirs_or_demo_bundles_serve_exits_with_status_2(
    monkeypatch, tmp_path: Path, capsys
) -> None:
    monkeypatch.delenv("HORNET_MODEL_DIR", raising=False)
    monkeypatch.setattr(settings_module, "DEMO_BUNDLES_DIR", tmp_path / "no_demos")
    assert cli.serve_main([]) == 2
    assert "--model-dir" in capsys.readouterr().err


def test_demo_bundles_are_the_default_model_dirs(
    monkeypatch, tmp_path: Path, classifier_dir: Path
) -> None:
    demos = tmp_path / "demo_bundles"
    (demos / "not_a_bundle").mkdir(parents=True)
    (demos / "tiny").symlink_to(classifier_dir)
    monkeypatch.delenv("HORNET_MODEL_DIR", raising=False)
    monkeypatch.setattr(settings_module, "DEMO_BUNDLES_DIR", demos)
    settings = Settings()
    assert settings.model_dir == [demos / "tiny"]
    assert settings.uses_demo_bundles


def test_a_model_that_cannot_load_ends_the_server_with_status_1(classifier_dir: Path) -> None:
    """A bundle with no TensorRT engine served with --engine tensorrt: the engine fails in
    the background load, and the process exits 1 with the reason as its last line (the
    way Triton's --exit-on-error does), rather than running unready until a probe gives
    up on it."""
    command = [sys.executable, "-m", "service", "--model-dir", str(classifier_dir)]
    command += ["--engine", "tensorrt", "--port", str(free_port())]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1, finished.stderr[-2000:]
    last = finished.stderr.strip().splitlines()[-1]
    assert last.startswith("hornet serve: model loading failed: EngineUnavailable:"), last
    assert "tensorrt" in last and "--no-exit-on-load-error" in last


def test_without_exit_on_load_error_the_server_stays_up_naming_the_error(
    classifier_dir: Path, tmp_path: Path
) -> None:
    flags = ["--model-dir", str(classifier_dir), "--engine", "tensorrt"]
    flags += ["--no-exit-on-load-error"]
    log_path = tmp_path / "server.log"
    with running_server(flags, log_path=log_path, ready_path="/healthz") as server:
        deadline = time.monotonic() + 60
        while "EngineUnavailable" not in (ready := httpx.get(f"{server.url}/readyz")).text:
            assert server.process.poll() is None, server.log_tail()
            assert time.monotonic() < deadline, "/readyz never named the load error"
            time.sleep(0.2)
        assert ready.status_code == 503 and "tensorrt" in ready.json()["detail"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert server.process.returncode == 0


def test_the_server_raises_its_open_file_limit_to_the_hard_one(classifier_dir, tmp_path):
    """Started with a soft limit of 256 open files (below the hard one), the server
    raises it at start and serves a request while 400 other connections are open (with
    the soft limit left at 256 they would have taken every descriptor, and new
    connections would not be accepted until the client timeout closed them)."""
    flags = ["--model-dir", str(classifier_dir), "--client-timeout-s", "60"]
    log_path = tmp_path / "server.log"
    with running_server(flags, log_path=log_path, open_files_soft_limit=256) as server:
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
        soft, hard = line.split()[3:5]
        assert soft == hard and int(soft) > 256, line
        idle = [connect(server.url) for _ in range(400)]
        try:
            response = httpx.get(f"{server.url}/healthz", timeout=5)
            assert response.status_code == 200
        finally:
            for connection in idle:
                connection.close()


def test_running_server_caps_the_server_process_itself(classifier_dir, tmp_path):
    """running_server's limits (set by the server's interpreter before it execs the
    server, not in a preexec_fn) are the server process's own: its address space and
    the CPUs it may run on, read back from /proc."""
    cpus = {min(os.sched_getaffinity(0))}
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1"]
    with running_server(
        flags, log_path=tmp_path / "server.log", memory_limit_bytes=3 << 30, cpus=cpus
    ) as server:
        pid = server.process.pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        (line,) = [row for row in limits.splitlines() if row.startswith("Max address space")]
        assert line.split()[3:5] == [str(3 << 30)] * 2, line
        assert os.sched_getaffinity(pid) == cpus
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert command[1:3] == [b"-m", b"service"], command
        assert httpx.get(f"{server.url}/readyz").status_code == 200


def _nice_values(pid: int) -> dict[int, int]:
    """Each thread's nice value (field 19 of /proc/PID/task/TID/stat)."""
    values = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = stat.read_text().rpartition(")")[2].split()
        values[int(stat.parent.name)] = int(fields[16])
    return values


def test_decoding_threads_run_at_the_nice_value_asked(classifier_dir, tmp_path, photos) -> None:
    flags = ["--model-dir", str(classifier_dir), "--decode-threads", "2", "--decode-nice", "7"]
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with running_server(flags, log_path=tmp_path / "server.log") as (url, process, _):
        before = _nice_values(process.pid)
        images = [encode(photos[name]) for name in ("chelsea", "astronaut", "coffee", "rocket")]
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(
                pool.map(
                    lambda data: httpx.post(f"{url}/classify", files=upload(data), timeout=60),
                    images,
                )
            )
        assert [a.status_code for a in answers] == [200] * 4
        after = _nice_values(process.pid)
    assert set(before.values()) == {base}  # no decoding thread yet; the rest unchanged
    lowered = [tid for tid, nice in after.items() if nice == min(base + 7, 19)]
    assert 1 <= len(lowered) <= 2  # the decoding threads, started by the requests
    assert after[process.pid] == base  # the event loop's thread keeps its priority
    assert sum(nice == base for nice in after.values()) == len(after) - len(lowered)


def test_a_websocket_upgrade_is_answered_as_plain_http(parser_server) -> None:
    """No WebSocket route is served, so an Upgrade request gets the route's own JSON
    answer; before, uvicorn handed it to wsproto (installed beside the test tools), which
    answered an empty 403 that no route had said."""
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    for path, status, error in (("/healthz", 200, None), ("/nope", 404, "not_found")):
        with connect(parser_server.url) as connection:
            assert send(connection, f"GET {path} HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n".encode())
            got, headers, body = read_one_answer(connection)
        assert got == status and headers["content-type"] == "application/json"
        assert json.loads(body).get("error") == error
