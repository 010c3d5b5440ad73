"""gRPC clients that hold the server's places and send nothing, against a real server. A
call whose request message never completes is ended with DEADLINE_EXCEEDED
(`request_timeout`) --client-timeout-s after it began, and the place it held among the
server's concurrent calls is free again; a stream idle that long gives its slot up to
a new stream when every slot is taken.

gRPC counts a call among its concurrent ones (--max-upload-buffer-mb / --max-upload-mb,
16 by default) from its start, and awaited a unary call's message for ever: one
connection starting 16 calls that each sent 10 bytes of a 1000-byte message (about a
kilobyte in all) took every place, and every later call, from anyone, was refused with
RESOURCE_EXHAUSTED for as long as that connection stayed open. The calls are framed by
hand with h2 (HTTP/2), since no gRPC client sends a message cut short.
"""

from __future__ import annotations

import functools
import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import numpy as np
import pytest

from service.testing import free_port, running_server
from tests.helpers.queueing import metric, queued_photo
from tests.helpers.waiting import wait_until

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

CLIENT_TIMEOUT_S = 2.0
CALLS = 16  # the server's concurrent calls at its default budgets
INFER = "/inference.GRPCInferenceService/ModelInfer"


class RawCalls:
    """One HTTP/2 connection to the gRPC port, its calls' frames written by hand."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.connection.initiate_connection()
        self.ends: dict[int, dict[bytes, bytes]] = {}

    def start(self, path: str, message: bytes | None) -> int:
        """A call to `path` sending `message` (gRPC's length-prefixed frame, as given)
        without ending its stream; with None, a call ended with no message at all."""
        stream = self.connection.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", "hornet"), ("content-type", "application/grpc"),
                   ("te", "trailers")]  # fmt: skip
        self.connection.send_headers(stream, headers, end_stream=message is None)
        if message is not None:
            self.connection.send_data(stream, message)
        self.socket.sendall(self.connection.data_to_send())
        return stream

    def read_ends(self, count: int, within_s: float) -> dict[int, dict[bytes, bytes]]:
        """The grpc-status and grpc-message each call ended with, once `count` have."""
        give_up_at = time.monotonic() + within_s
        while len(self.ends) < count and time.monotonic() < give_up_at:
            self.socket.settimeout(max(give_up_at - time.monotonic(), 0.01))
            try:
                data = self.socket.recv(1 << 16)
            except TimeoutError:
                break
            if not data:
                break
            for event in self.connection.receive_data(data):
                if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                    fields = dict(event.headers)
                    if b"grpc-status" in fields:
                        self.ends[event.stream_id] = fields
            self.socket.sendall(self.connection.data_to_send())
        return self.ends

    def close(self) -> None:
        self.socket.close()


def test_a_call_whose_message_never_completes_is_ended_and_its_place_freed(
    classifier_dir, tmp_path
) -> None:
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--grpc-port", str(port)]
    flags += ["--client-timeout-s", str(CLIENT_TIMEOUT_S)]
    with running_server(flags, log_path=tmp_path / "server.log") as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        raw = RawCalls(port)
        try:
            cut_short = b"\x00" + struct.pack(">I", 1000) + b"x" * 10  # 10 of 1000 bytes
            started = time.monotonic()
            squatters = [raw.start(INFER, cut_short) for _ in range(CALLS)]
            time.sleep(0.5)
            # the attack is real: while they hold every place, other calls are refused
            with pytest.raises(InferenceServerException) as refused:
                client.is_server_live()
            assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            ends = raw.read_ends(CALLS, within_s=CLIENT_TIMEOUT_S + 10)
            ended_after = time.monotonic() - started
            assert sorted(ends) == squatters, "the calls cut short were never ended"
            for fields in ends.values():
                assert fields[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED
                assert fields[b"grpc-message"].startswith(b"request_timeout: the request ")
            assert CLIENT_TIMEOUT_S - 0.5 < ended_after < CLIENT_TIMEOUT_S + 5
            # the connection is still open, and the places are free again
            assert client.is_server_live()
            # a call that ends without its message is refused at once
            empty = raw.start(INFER, None)
            assert raw.read_ends(CALLS + 1, within_s=5)[empty][b"grpc-status"] == b"3"
        finally:
            raw.close()
            client.close()
        timed_out = metric(server.url, f'hornet_requests_total{{route="{INFER}",status="408"}}')
        assert timed_out == CALLS


def test_a_new_stream_takes_the_place_of_the_one_idle_longest(classifier_dir, tmp_path) -> None:
    """Every stream slot taken (8): a ninth stream is refused while none has been idle
    for --client-timeout-s, and once some have, the next one ends the stream idle
    longest (UNAVAILABLE) and takes its slot; a stream that answered a request since is
    not the one ended. Before, 8 streams opened and left idle kept every other stream
    out for as long as they stayed open."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--grpc-port", str(port)]
    flags += ["--client-timeout-s", str(CLIENT_TIMEOUT_S)]
    ended: dict[int, list[str]] = {}
    answered: dict[int, int] = {}

    def callback(index: int, result, error) -> None:
        if error is not None:
            ended.setdefault(index, []).append(error.message())
        else:
            answered[index] = answered.get(index, 0) + 1

    def photo() -> list:
        tensor = grpcclient.InferInput("encoded_image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([queued_photo()], dtype=np.object_))
        return [tensor]

    clients = []
    with running_server(flags, log_path=tmp_path / "server.log"):
        try:
            clients += [grpcclient.InferenceServerClient(f"127.0.0.1:{port}") for _ in range(10)]
            for index in range(8):
                clients[index].start_stream(functools.partial(callback, index))
                time.sleep(0.02)  # opened in order: stream 0 first
            opened = time.monotonic()
            clients[8].start_stream(functools.partial(callback, 8))
            wait_until(lambda: 8 in ended, 10.0, every_s=0.01)
            assert "8 streams are open" in ended[8][0] and "none idle" in ended[8][0]
            # stream 0 answers a request halfway through the idle time: no longer the idlest
            time.sleep(CLIENT_TIMEOUT_S / 2)
            clients[0].async_stream_infer("tiny_cls", photo())
            wait_until(lambda: answered.get(0) == 1, 10.0, every_s=0.01)
            time.sleep(max(opened + CLIENT_TIMEOUT_S + 0.3 - time.monotonic(), 0))
            clients[9].start_stream(functools.partial(callback, 9))
            wait_until(lambda: 1 in ended, 10.0, every_s=0.01)
            assert "held no request for 2 s or more" in ended[1][0]
            assert set(ended) == {1, 8}  # stream 0, busy since, and the rest kept open
            clients[9].async_stream_infer("tiny_cls", photo())
            wait_until(lambda: answered.get(9) == 1, 10.0, every_s=0.01)
        finally:
            for client in clients:
                client.close()


def test_a_connection_that_never_begins_http2_is_closed(classifier_dir, tmp_path) -> None:
    """--client-timeout-s after it opened, as an HTTP connection with no request head (it
    stayed open 60 s, gRPC's own handshake timeout)."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--grpc-port", str(port)]
    flags += ["--client-timeout-s", str(CLIENT_TIMEOUT_S)]
    with running_server(flags, log_path=tmp_path / "server.log"):
        silent = socket.create_connection(("127.0.0.1", port), timeout=30)
        opened = time.monotonic()
        try:
            while silent.recv(1 << 16):  # the server's SETTINGS, then its end
                pass
        except ConnectionResetError:
            pass
        finally:
            silent.close()
        assert time.monotonic() - opened < CLIENT_TIMEOUT_S + 3
