"""--max-connection-age-s against a real server process: a connection open that long is
ended between requests, so its client reconnects and, through a Kubernetes Service,
may land on a replica added since (the Service balances connections; without an age, a
client's keep-alive connection stayed on its first pod for ever). Over HTTP the first
answer after the age closes the connection, whole; over gRPC the server sends GOAWAY and
a client's next call goes over a new connection, answered.
"""

from __future__ import annotations

import socket
import time

import pytest

from service.testing import free_port, running_server
from tests.helpers.raw_http import connect, get, read_one_answer, read_until_closed, send

AGE_S = 1.0


def test_an_http_connection_past_its_age_is_closed_after_its_next_answer(
    http_parser, classifier_dir, tmp_path
) -> None:
    flags = ["--model-dir", str(classifier_dir), "--http-parser", http_parser]
    flags += ["--max-connection-age-s", str(AGE_S)]
    with running_server(flags, log_path=tmp_path / "server.log") as server:
        connection = connect(server.url)
        try:
            for _ in range(3):  # young: kept alive
                assert send(connection, get("/healthz"))
                status, headers, _ = read_one_answer(connection)
                assert status == 200 and headers.get("connection") != "close"
            time.sleep(AGE_S + 0.3)
            assert send(connection, get("/readyz"))
            status, headers, body = read_one_answer(connection)
            assert status == 200 and b'"ready"' in body  # answered whole
            assert headers["connection"] == "close"  # said, so the client sends no more
            assert read_until_closed(connection) == b""  # then closed by the server
        finally:
            connection.close()
        # a new connection is young again
        fresh = connect(server.url)
        try:
            assert send(fresh, get("/healthz"))
            assert read_one_answer(fresh)[1].get("connection") != "close"
        finally:
            fresh.close()


def test_without_an_age_a_connection_stays(classifier_dir, tmp_path) -> None:
    with running_server(["--model-dir", str(classifier_dir)], log_path=tmp_path / "s.log") as s:
        connection = connect(s.url)
        try:
            time.sleep(AGE_S + 0.3)
            for _ in range(2):
                assert send(connection, get("/healthz"))
                assert read_one_answer(connection)[1].get("connection") != "close"
        finally:
            connection.close()


# A client's HTTP/2 preface and its (empty) SETTINGS frame.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_GOAWAY = 0x7


def _goaway_within(port: int, seconds: float) -> float | None:
    """Seconds until the server's first GOAWAY frame on a new HTTP/2 connection to `port`
    that makes no call; None if none came within `seconds`."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as raw:
        raw.sendall(_PREFACE)
        opened, received = time.monotonic(), b""
        while (left := seconds - (time.monotonic() - opened)) > 0:
            raw.settimeout(left)
            try:
                data = raw.recv(1 << 16)
            except TimeoutError:
                return None
            if not data:
                return None
            received += data
            while len(received) >= 9:  # each frame: length (3 bytes), type, flags, stream
                length = int.from_bytes(received[:3], "big")
                if len(received) < 9 + length:
                    break
                if received[3] == _GOAWAY:
                    return time.monotonic() - opened
                received = received[9 + length :]
    return None


@pytest.mark.parametrize("age", [AGE_S, 0.0])
def test_a_grpc_connection_past_its_age_gets_goaway_and_calls_go_on(
    classifier_dir, tmp_path, age: float
) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--grpc-port", str(port)]
    flags += ["--max-connection-age-s", str(age)]
    with running_server(flags, log_path=tmp_path / "server.log"):
        waited = _goaway_within(port, AGE_S * 3 + 2)
        if age:
            # gRPC core jitters the age by up to 10%
            assert waited is not None and AGE_S * 0.8 < waited < AGE_S * 3 + 2
        else:
            assert waited is None
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            for _ in range(3):  # across the age: the client reconnects by itself
                assert client.is_server_ready()
                time.sleep(AGE_S * 0.7)
        finally:
            client.close()
