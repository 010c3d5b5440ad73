"""--max-connections against a real server process: past the limit a new HTTP connection
is answered 503 (JSON, Retry-After) and closed as it opens, costing the server nothing;
the connections already open are served as before; gRPC's listener refuses past the same
limit. Before the limit, each connection a client opened (and held, resending a byte
inside the head clock) cost the server about 7 KiB and a descriptor, without bound.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.testing import RunningServer, free_port, running_server
from tests.helpers.memory import descriptors_for, memory_of
from tests.helpers.raw_http import (
    connect,
    get,
    parse_answer,
    read_one_answer,
    read_until_closed,
    send,
)

MIB = 1 << 20
LIMIT = 8


@contextlib.contextmanager
def _serve(classifier_dir: Path, tmp_path: Path, *flags: str) -> Iterator[RunningServer]:
    with running_server(
        ["--model-dir", str(classifier_dir), *flags],
        log_path=tmp_path / "server.log",
        memory_limit_bytes=6 << 30,
    ) as server:
        yield server


@pytest.fixture
def server(http_parser, classifier_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    flags = ["--http-parser", http_parser, "--max-connections", str(LIMIT)]
    with _serve(classifier_dir, tmp_path, *flags) as running:
        yield running


def _counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_past_the_limit_a_connection_is_answered_503_and_closed(server) -> None:
    held = [connect(server.url) for _ in range(LIMIT)]
    try:
        # every one of them is served: uvicorn has made them its connections
        for connection in held:
            assert send(connection, get("/healthz"))
            assert read_one_answer(connection)[0] == 200
        extra = connect(server.url)
        status, headers, body = parse_answer(read_until_closed(extra))
        assert status == 503
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        answer = json.loads(body)
        assert answer["error"] == "too_many_connections"
        assert f"its {LIMIT} open connections (--max-connections)" in answer["detail"]
        # the open ones are unaffected, keep-alive and all
        assert send(held[0], get("/readyz"))
        assert read_one_answer(held[0])[0] == 200
        for connection in held[:2]:
            connection.close()
        # two places free: one for the next client, one for the metrics read
        answer = httpx.get(f"{server.url}/readyz")
        assert answer.status_code == 200
        counters = _counters(server.url)
        assert counters["hornet_connections_refused_total"] == 1
        # the metrics' own connection and the LIMIT - 2 still held
        assert counters["hornet_http_connections"] == LIMIT - 1
    finally:
        for connection in held:
            connection.close()
    log = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    said = [line for line in log if line["message"].startswith("connections refused")]
    assert len(said) == 1 and said[0]["max_connections"] == LIMIT and said[0]["refused"] == 1


def test_connections_past_the_limit_cost_the_server_no_memory(classifier_dir, tmp_path) -> None:
    """2000 connections opened and held by the client, 16 of them accepted: the server's
    resident size grows by well under the 14 MB that 2000 connections of its own cost."""
    count = descriptors_for(2000)
    held: list[socket.socket] = []
    try:
        with _serve(classifier_dir, tmp_path, "--max-connections", "16") as running:
            httpx.get(f"{running.url}/readyz")  # the server's first answer made its objects
            before = memory_of(running.process.pid)
            for _ in range(count):
                held.append(connect(running.url))
            # each refused one is answered and closed by the server as it opens
            assert parse_answer(read_until_closed(held[-1]))[0] == 503
            after = memory_of(running.process.pid)
            for connection in held:
                connection.close()
            held.clear()
            counters = _counters(running.url)
        assert counters["hornet_connections_refused_total"] == count - 16
        assert after["VmRSS"] - before["VmRSS"] < 4 * MIB, (count, before, after)
    finally:
        for connection in held:
            connection.close()


def test_the_grpc_listener_refuses_past_the_limit(classifier_dir, tmp_path) -> None:
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    port = free_port()
    flags = ["--grpc-port", str(port), "--max-connections", "2"]
    channels = []

    def live() -> bool:
        # a channel of its own connection (channels to one address share one by default)
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        channels.append(channel)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live

    try:
        with _serve(classifier_dir, tmp_path, *flags):
            assert live() and live()
            with pytest.raises(grpc.RpcError) as refused:
                live()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            channels[0].close()
            # a place freed, once the server has seen that connection close
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert live()
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
    finally:
        for channel in channels:
            channel.close()


def test_past_the_per_client_limit_a_connection_from_that_address_is_answered_429(
    http_parser, classifier_dir, tmp_path
) -> None:
    """--max-connections-per-client: one address holding its connections keeps no one
    else out, and gets 429 (JSON, Retry-After) for its next as it opens."""
    per_client = 3
    flags = ["--http-parser", http_parser, "--max-connections-per-client", str(per_client)]
    with _serve(classifier_dir, tmp_path, *flags) as server:
        held = [connect(server.url, source="127.0.0.2") for _ in range(per_client)]
        try:
            for connection in held:
                assert send(connection, get("/healthz"))
                assert read_one_answer(connection)[0] == 200
            status, headers, body = parse_answer(
                read_until_closed(connect(server.url, source="127.0.0.2"))
            )
            assert status == 429 and headers["retry-after"] == "1"
            answer = json.loads(body)
            assert answer["error"] == "too_many_connections_from_client"
            assert "(--max-connections-per-client)" in answer["detail"]
            # another address is served, and counted apart
            others = [connect(server.url, source="127.0.0.3") for _ in range(per_client)]
            for connection in others:
                assert send(connection, get("/readyz"))
                assert read_one_answer(connection)[0] == 200
                connection.close()
            # a place of the first address freed: its next connection is taken
            held.pop().close()
            deadline = time.monotonic() + 10
            while True:
                again = connect(server.url, source="127.0.0.2")
                if send(again, get("/healthz")):
                    try:
                        if read_one_answer(again)[0] == 200:
                            held.append(again)
                            break
                    except (ConnectionError, ValueError, OSError):
                        pass
                again.close()
                assert time.monotonic() < deadline, "the freed place was never taken"
                time.sleep(0.05)
            counters = _counters(server.url)
            assert counters["hornet_connections_refused_total"] == 1
        finally:
            for connection in held:
                connection.close()
