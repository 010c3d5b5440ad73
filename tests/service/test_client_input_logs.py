"""What a client does is said once in the log, by its request's access line, not by a
library's own lines beside it: python-multipart wrote a warning for each malformed part
of a body, and asyncio an error for each gRPC call cancelled while it waited, in plain
text on standard error before the server's log took every library's lines
(service.logs.configure_logging), as JSON lines after."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.testing import free_port, running_server
from tests.helpers.logs import json_lines


def test_a_malformed_multipart_body_is_one_access_line(classifier_dir: Path, tmp_path) -> None:
    log = tmp_path / "server.log"
    boundary = "b0undary"
    # a quote inside a part's header name: python-multipart warns "Found invalid
    # character 34 in header" and stops
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n'
        f'X-"Quoted": 1\r\n\r\nnot an image\r\n--{boundary}--\r\n'
    ).encode()
    with running_server(["--model-dir", str(classifier_dir)], log_path=log) as server:
        for _ in range(3):
            answer = httpx.post(
                f"{server.url}/classify",
                content=body,
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                timeout=30,
            )
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"] == "bad_request"
    lines = json_lines(log)
    refused = [line for line in lines if line.get("path") == "/classify"]
    assert [line["status"] for line in refused] == [400, 400, 400]
    assert not [line for line in lines if line["logger"].startswith("python_multipart")]


def test_cancelled_grpc_calls_leave_no_error_line(slow_classifier_dir: Path, tmp_path) -> None:
    """gRPC clients that cancel their calls while the requests wait for the engine: the
    requests end there, and the log has no error line for them. Before, each cancelled
    request left asyncio's "_GatheringFuture exception was never retrieved" error line
    (the batcher's gather of the request's items, cancelled under its waiter), in plain
    text until the server's log took every library's lines."""
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2

    pixels = np.full((1, 224, 224, 3), 80, np.uint8)
    request = service_pb2.ModelInferRequest(model_name="slow_cls")
    request.inputs.add(name="image", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    data = request.SerializeToString()
    port = free_port()
    log = tmp_path / "server.log"
    flags = ["--model-dir", str(slow_classifier_dir), "--engine-threads", "1"]
    flags += ["--grpc-port", str(port), "--max-batch-size", "1"]
    with running_server(flags, log_path=log) as server:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
            for _ in range(5):
                # behind the others' 45 ms runs: waiting for the engine when cancelled
                waiting = [call.future(data, timeout=30) for _ in range(3)]
                answers = stream(iter([data] * 3), timeout=30)
                time.sleep(0.05)
                for cancelled in (*waiting, answers):
                    cancelled.cancel()
            call(data, timeout=60)  # still served
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        time.sleep(0.5)  # the log's writer has written every line
        lines = json_lines(log)
    errors = [line for line in lines if line["level"] == "error"]
    assert not errors, errors[:3]
    cancelled = [line for line in lines if line.get("status") == 499]
    assert cancelled  # the requests were cancelled in the server, as the test means
