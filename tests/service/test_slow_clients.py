"""Slow, stalled and many clients against a real server process: the request bodies
held at once are bounded over all requests (--max-upload-buffer-mb), and a client that
stops sending its head or its body is answered 408 and let go (--client-timeout-s).

Before these bounds, 30 connections each sending 20 MB less one byte of a 20 MB body
and then nothing held 600 MB of the server for as long as they stayed open (for ever:
nothing timed them out), and a connection that sent half a request line stayed open too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from service.testing import RunningServer, running_server
from tests.helpers.images import encode
from tests.helpers.memory import memory_of
from tests.helpers.raw_http import connect, parse_answer, read_one_answer, read_until_closed, send
from tests.helpers.references import assert_official_scores

MIB = 1 << 20
CLIENT_TIMEOUT_S = 2.0


def _serve(classifier_dir: Path, tmp_path: Path, *flags: str) -> Iterator[RunningServer]:
    every = ["--model-dir", str(classifier_dir), "--client-timeout-s", str(CLIENT_TIMEOUT_S)]
    # A regression that holds every body must fail the server, not the machine.
    with running_server(
        [*every, *flags], log_path=tmp_path / "server.log", memory_limit_bytes=6 << 30
    ) as server:
        yield server


@pytest.fixture
def server(http_parser, classifier_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    yield from _serve(classifier_dir, tmp_path, "--http-parser", http_parser)


@pytest.fixture
def small_upload_server(
    http_parser, classifier_dir: Path, tmp_path: Path
) -> Iterator[RunningServer]:
    """1 MiB uploads; a client timeout (30 s) longer than its test waits."""
    flags = ["--http-parser", http_parser, "--max-upload-mb", "1", "--client-timeout-s", "30"]
    yield from _serve(classifier_dir, tmp_path, *flags)


@pytest.fixture
def small_buffer_server(classifier_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """4 MiB uploads, 12 MiB for all bodies together."""
    yield from _serve(
        classifier_dir, tmp_path, "--max-upload-mb", "4", "--max-upload-buffer-mb", "12"
    )


def _head(length: int | None = None) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    start = b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
    return start + framing + b"\r\n\r\n"


def _buffer_held(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = text_string_to_metric_families(text)
    (family,) = [f for f in families if f.name == "hornet_upload_buffer_bytes"]
    return family.samples[0].value


def _classify_photo(url: str, photo) -> None:
    response = httpx.post(
        f"{url}/classify", params={"top_k": 10}, content=encode(photo),
        headers={"content-type": "image/png"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert_official_scores(response.json()["results"][0], photo)


def test_stalled_uploads_hold_at_most_the_buffer_and_are_let_go(small_buffer_server, photos):
    """20 clients each send a 4 MiB body less its last byte and stop: three fit the 12 MiB
    buffer and are held until the client timeout answers them 408; the other seventeen
    get 503 with Retry-After before their bodies are read. Memory stays near the buffer,
    not 20 x 4 MiB, and comes back; afterwards the server classifies a photograph."""
    url, process, _ = small_buffer_server
    idle = memory_of(process.pid)["VmRSS"]
    connections = []
    for _ in range(20):
        connection = connect(url)
        if send(connection, _head(4 * MIB)):
            send(connection, bytes(4 * MIB - 1))
        connections.append(connection)
    held = memory_of(process.pid)["VmRSS"] - idle
    answers = [
        parse_answer(read_until_closed(connection)) for connection in connections
    ]  # each closes in time
    for connection in connections:
        connection.close()
    statuses = [status for status, _, _ in answers]
    assert sorted(statuses) == [408] * 3 + [503] * 17, statuses
    for status, headers, body in answers:
        error = json.loads(body)
        if status == 503:
            assert error["error"] == "overloaded" and "--max-upload-buffer-mb" in error["detail"]
            assert headers["retry-after"] == "1"
        else:
            assert error["error"] == "request_timeout" and "--client-timeout-s" in error["detail"]
            assert headers["connection"] == "close"
    assert held < 40 * MIB, f"20 stalled uploads held {held / MIB:.0f} MiB"
    time.sleep(0.5)
    assert _buffer_held(url) == 0
    _classify_photo(url, photos["chelsea"])
    assert memory_of(process.pid)["VmRSS"] - idle < 40 * MIB


def test_a_chunked_body_is_counted_against_the_buffer_as_it_arrives(small_buffer_server):
    """With 10 of the 12 MiB held by stalled uploads, a chunked body (no Content-Length
    to reserve up front) is refused with 503 once it passes the 2 MiB left, before its
    own 4 MiB limit."""
    url = small_buffer_server.url
    stalled = []
    for size in (4 * MIB, 4 * MIB, 2 * MIB):
        connection = connect(url)
        assert send(connection, _head(size) + bytes(size - 1))
        stalled.append(connection)
    chunked = connect(url)
    send(chunked, _head())
    piece = b"%x\r\n" % (MIB // 2) + bytes(MIB // 2) + b"\r\n"
    for _ in range(7):  # 3.5 MiB, under the upload limit
        if not send(chunked, piece):
            break
        time.sleep(0.05)
    status, _, body = parse_answer(read_until_closed(chunked))
    assert status == 503, body
    assert json.loads(body)["error"] == "overloaded"
    chunked.close()
    for connection in stalled:
        assert parse_answer(read_until_closed(connection))[0] == 408
        connection.close()


def test_a_body_that_stops_is_answered_408_and_one_that_keeps_coming_is_served(server, photos):
    """The clock is on the gap between pieces of a body, not on the whole: a photograph
    sent in pieces 0.4 s apart over more than the client timeout is classified, and a
    body that stops gets 408 with a JSON body and the connection closed."""
    photo = encode(photos["chelsea"])
    slow = connect(server.url)
    head = _head(len(photo)).replace(b"/classify", b"/classify?top_k=10")
    send(slow, head)
    pieces = np.array_split(np.frombuffer(photo, np.uint8), 8)
    started = time.monotonic()
    for piece in pieces:
        time.sleep(0.4)
        send(slow, piece.tobytes())
    status, _, body = read_one_answer(slow)
    assert time.monotonic() - started > CLIENT_TIMEOUT_S
    assert status == 200, body
    assert_official_scores(json.loads(body)["results"][0], photos["chelsea"])
    slow.close()

    stopped = connect(server.url)
    send(stopped, _head(len(photo)) + photo[:1000])
    started = time.monotonic()
    status, headers, body = parse_answer(read_until_closed(stopped))
    waited = time.monotonic() - started
    assert status == 408, body
    assert json.loads(body)["error"] == "request_timeout"
    assert "1000 bytes received" in json.loads(body)["detail"]
    assert headers["connection"] == "close"
    assert CLIENT_TIMEOUT_S * 0.9 < waited < CLIENT_TIMEOUT_S + 10
    stopped.close()


def test_a_body_over_the_limit_is_answered_413_and_the_rest_not_read(small_upload_server):
    """A chunked body (no Content-Length to refuse up front) that passes --max-upload-mb
    gets 413 and its connection closed: the server does not go on reading what the
    client keeps sending. Without `connection: close` uvicorn would read and throw away
    the rest of the body for as long as it came (until the client timeout's head clock
    ran out)."""
    server, limit = small_upload_server, MIB
    connection = connect(server.url)
    send(connection, _head())
    piece = b"%x\r\n" % (limit // 4) + bytes(limit // 4) + b"\r\n"
    for _ in range(5):  # 1.25 MiB
        send(connection, piece)
    status, headers, body = read_one_answer(connection)
    assert status == 413, body
    assert json.loads(body)["error"] == "payload_too_large"
    assert headers["connection"] == "close"
    small = b"%x\r\n" % 4096 + bytes(4096) + b"\r\n"
    deadline = time.monotonic() + 10
    while send(connection, small) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert time.monotonic() < deadline, "the server kept reading a refused body"
    connection.close()
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'hornet_requests_total{route="/classify",status="413"} 1.0' in metrics


@pytest.mark.parametrize("when", ["new connection", "after an answer"])
def test_a_head_that_does_not_arrive_in_time_is_answered_408(server, when):
    """Half a request line, on a new connection or on one kept alive after an answer,
    gets 408 with a JSON body after the client timeout and the connection closed; a
    connection that sends nothing is closed without a word. uvicorn's own protocols
    keep both open for ever."""
    partial, idle = connect(server.url), connect(server.url)
    if when == "after an answer":
        send(partial, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert read_one_answer(partial)[0] == 200
    started = time.monotonic()
    send(partial, b"GET /heal")
    status, headers, body = parse_answer(read_until_closed(partial))
    waited = time.monotonic() - started
    assert status == 408, body
    assert json.loads(body) == {
        "error": "request_timeout",
        "detail": f"the request line and headers did not arrive within {CLIENT_TIMEOUT_S:g} s "
        "(--client-timeout-s)",
    }
    assert CLIENT_TIMEOUT_S * 0.9 < waited < CLIENT_TIMEOUT_S + 10
    assert idle.recv(1) == b""  # closed by then, nothing said
    partial.close()
    idle.close()
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_the_buffer_must_hold_the_largest_upload() -> None:
    assert Settings(max_upload_mb=20).upload_buffer_bytes == 320 * MIB  # 16 uploads' worth
    assert Settings(max_upload_mb=2, max_upload_buffer_mb=5).upload_buffer_bytes == 5 * MIB
    with pytest.raises(ValueError, match="could never be received"):
        Settings(max_upload_mb=20, max_upload_buffer_mb=10)
