"""Every answered inference request says where its time in the server went, in a
`Server-Timing` header (W3C Server Timing; browsers' developer tools show it), and a gRPC
ModelInfer in its `server-timing` trailing metadata (a stream's answer in its
`server_timing` parameter): decoding and preprocessing, the
batch queue, the engine and the answer, in milliseconds. Checked against a real server:
the engine's stage covers the slow classifier's graph timed alone in the test, the
stages' sum is within the time the client saw, and the model's statistics (Triton's
statistics extension) grew by exactly these figures, so the two views agree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.testing import RunningServer, free_port, running_server
from tests.helpers.images import encode
from tests.helpers.server_timing import parse_server_timing

STAGES = ["compute_input", "queue", "compute_infer", "compute_output"]


def _stats(url: str, model: str) -> dict[str, int]:
    """The model's cumulative ns per stage (GET /v2/models/M/stats)."""
    stats = httpx.get(f"{url}/v2/models/{model}/stats").json()["model_stats"][0]
    return {stage: stats["inference_stats"][stage]["ns"] for stage in STAGES}


GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def served(slow_classifier_dir: Path, tmp_path_factory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("timing") / "server.log"
    flags = ["--model-dir", str(slow_classifier_dir), "--engine-threads", "1"]
    flags += ["--grpc-port", str(GRPC_PORT)]
    with running_server(flags, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def engine_ms(slow_classifier_dir: Path) -> float:
    """The slow classifier's graph run by ONNX Runtime in this process, on one thread as
    the server runs it: the fastest of five runs, in ms."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(slow_classifier_dir / "model.onnx"), options)
    feed = {session.get_inputs()[0].name: np.zeros((1, 224, 224, 3), np.uint8)}
    times = []
    for _ in range(5):
        began = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - began) * 1000)
    return min(times)


def _check_against_the_statistics(
    url: str,
    engine_ms: float,
    send,
    model: str = "slow_cls",  # noqa: ANN001
) -> dict[str, float]:
    before = _stats(url, model)
    began = time.perf_counter()
    answer = send()
    seen_ms = (time.perf_counter() - began) * 1000
    assert answer.status_code == 200, answer.text
    stages = parse_server_timing(answer.headers["server-timing"])
    assert list(stages) == STAGES
    after = _stats(url, model)
    for stage in STAGES:  # the statistics grew by the header's figure (to its microsecond)
        assert abs((after[stage] - before[stage]) / 1e6 - stages[stage]) <= 0.001, stage
    assert stages["compute_infer"] >= 0.5 * engine_ms  # the engine's run, timed alone
    assert sum(stages.values()) <= seen_ms
    return stages


def test_the_image_routes_time_their_stages(served: RunningServer, engine_ms: float) -> None:
    image = encode(np.full((300, 400, 3), 120, np.uint8), "PNG")
    for _ in range(2):
        _check_against_the_statistics(
            served.url,
            engine_ms,
            lambda: httpx.post(
                f"{served.url}/classify", content=image, headers={"content-type": "image/png"}
            ),
        )


def test_v2_infer_times_its_stages(served: RunningServer, engine_ms: float) -> None:
    pixels = np.full((1, 224, 224, 3), 90, np.uint8)
    for binary in (True, False):
        tensor = {"name": "image", "shape": list(pixels.shape), "datatype": "UINT8"}
        if binary:
            tensor["parameters"] = {"binary_data_size": pixels.nbytes}
            head = json.dumps({"inputs": [tensor]}).encode()
            body, headers = (
                head + pixels.tobytes(),
                {"Inference-Header-Content-Length": str(len(head))},
            )
        else:
            tensor["data"] = pixels.ravel().tolist()
            body, headers = json.dumps({"inputs": [tensor]}).encode(), {}
        _check_against_the_statistics(
            served.url,
            engine_ms,
            lambda body=body, headers=headers: httpx.post(
                f"{served.url}/v2/models/slow_cls/infer", content=body, headers=headers
            ),
        )


class _Answer:
    """A gRPC call's outcome in the shape _check_against_the_statistics reads."""

    def __init__(self, trailing: tuple) -> None:
        self.status_code = 200
        self.text = ""
        self.headers = {"server-timing": dict(trailing)["server-timing"]}


def test_a_grpc_model_infer_carries_its_stages_in_its_trailing_metadata(
    served: RunningServer, engine_ms: float
) -> None:
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    pixels = np.full((1, 224, 224, 3), 60, np.uint8)
    request = service_pb2.ModelInferRequest(model_name="slow_cls")
    request.inputs.add(name="image", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def send() -> _Answer:
            _, call = stub.ModelInfer.with_call(request, timeout=30)
            trailing = call.trailing_metadata()
            assert dict(trailing)["x-request-id"]
            return _Answer(trailing)

        _check_against_the_statistics(served.url, engine_ms, send)


def test_a_grpc_streams_answers_carry_their_stages_in_a_parameter(
    served: RunningServer, engine_ms: float
) -> None:
    """A stream's trailing metadata comes once, at its end: each answer carries its own
    stages in its `server_timing` parameter instead, as tritonclient's stream callback
    receives it."""
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    pixels = np.full((1, 224, 224, 3), 30, np.uint8)
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def send() -> _Answer:
            request = service_pb2.ModelInferRequest(model_name="slow_cls", id="streamed")
            request.inputs.add(name="image", datatype="UINT8", shape=list(pixels.shape))
            request.raw_input_contents.append(pixels.tobytes())
            (answer,) = stub.ModelStreamInfer(iter([request]), timeout=30)
            assert not answer.error_message and answer.infer_response.id == "streamed"
            timing = answer.infer_response.parameters["server_timing"].string_param
            return _Answer((("server-timing", timing),))

        for _ in range(2):
            _check_against_the_statistics(served.url, engine_ms, send)


def test_a_refused_request_has_no_timing(served: RunningServer) -> None:
    answer = httpx.post(
        f"{served.url}/classify", content=b"not an image", headers={"content-type": "image/png"}
    )
    assert answer.status_code in (400, 415) and "server-timing" not in answer.headers
