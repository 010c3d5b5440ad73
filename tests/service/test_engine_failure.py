"""An engine that raises fails only its own batch's requests, with 500, the request id in
the body and the traceback in the log, and the service stays ready; a bundle whose file
fails its sha256 check stops `hornet serve` at start-up with one line and exit status 2."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest

from service.engines import create_engine
from service.logs import JsonFormatter
from tests.helpers.engines import InstrumentedEngine, InstrumentedFactory
from tests.helpers.images import encode, upload
from tests.helpers.serving import serving

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


class FailingOnceEngine(InstrumentedEngine):
    """After `arm()`, holds the next batch it gets until `release` is set, then fails it
    (InstrumentedEngine's injected RuntimeError); batches before and after run normally."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.armed = False
        self.holding = threading.Event()
        self.release = threading.Event()

    def arm(self) -> None:
        self.armed = True

    def run(self, inputs):
        if not self.armed:
            return super().run(inputs)
        self.armed = False
        self.holding.set()
        self.release.wait(30)
        self.fail = True
        try:
            return super().run(inputs)
        finally:
            self.fail = False


class FailingOnceFactory(InstrumentedFactory):
    def __call__(self, bundle, settings) -> FailingOnceEngine:
        engine = FailingOnceEngine(create_engine(bundle, settings))
        self.engines.append(engine)
        return engine


def v2_image_request() -> dict:
    pixels = np.zeros((1, 224, 224, 3), np.uint8)
    return {
        "inputs": [
            {"name": "image", "shape": list(pixels.shape), "datatype": "UINT8",
             "data": pixels.reshape(-1).tolist()}
        ]
    }  # fmt: skip


@pytest.fixture
def json_log():
    """The service's log lines as the JSON formatter writes them (request ids included)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("hornet")
    logger.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_engine_error_fails_only_its_batch_with_500_and_request_ids(
    classifier_dir, host_normalised_dir, photos, json_log
) -> None:
    image = encode(photos["chelsea"])
    factory = FailingOnceFactory()
    async with serving(
        [classifier_dir, host_normalised_dir],
        engine_factory=factory,
        max_batch_size=2,
        max_delay_ms=10_000,  # a batch closes when it holds two requests, not on a timer
        close_batches_early=False,  # nor when the second is not yet on its way
    ) as client:
        engine = client.app.state.pool.runners["tiny_cls"].engines[0]
        responses: dict[str, object] = {}

        async def classify(name: str, model: str) -> None:
            headers = {"x-request-id": name}
            if name == "failing-rest":  # one traced request (W3C Trace Context's example)
                headers["traceparent"] = f"00-{TRACE}-00f067aa0ba902b7-01"
            responses[name] = await client.post(
                "/classify", params={"model": model}, files=upload(image), headers=headers
            )

        async def v2_infer(name: str) -> None:  # no X-Request-ID: the server makes one up
            responses[name] = await client.post(
                "/v2/models/tiny_cls/infer", json=v2_image_request()
            )

        engine.arm()
        async with anyio.create_task_group() as group:
            group.start_soon(classify, "failing-rest", "tiny_cls")
            group.start_soon(v2_infer, "failing-v2")
            with anyio.fail_after(30):
                await anyio.to_thread.run_sync(engine.holding.wait)
            # While the failing batch is held in the engine: the other model answers, and
            # two more requests queue for tiny_cls's next batch.
            group.start_soon(classify, "other-model-1", "tiny_cls_nchw")
            group.start_soon(classify, "other-model-2", "tiny_cls_nchw")
            group.start_soon(classify, "next-batch-1", "tiny_cls")
            group.start_soon(classify, "next-batch-2", "tiny_cls")
            queue = client.app.state.pool.runners["tiny_cls"].queue
            with anyio.fail_after(30):
                while queue.depth < 2:
                    await anyio.sleep(0.005)
            engine.release.set()
        ready = await client.get("/readyz")

    rest, v2 = responses.pop("failing-rest"), responses.pop("failing-v2")
    assert rest.status_code == 500 and v2.status_code == 500
    assert rest.json() == {
        "error": "engine_error",
        "detail": "model 'tiny_cls' engine failed: "
        "RuntimeError: engine failure injected by the test",
        "request_id": "failing-rest",
    }
    assert rest.headers["x-request-id"] == "failing-rest"
    assert set(v2.json()) == {"error", "request_id"}
    assert v2.json()["error"].startswith("engine_error: model 'tiny_cls' engine failed")
    assert v2.json()["request_id"] == v2.headers["x-request-id"]
    assert {name: r.status_code for name, r in responses.items()} == dict.fromkeys(responses, 200)
    assert engine.batch_sizes[-2:] == [2, 2]  # the failed batch, then the next one
    assert ready.status_code == 200

    lines = json_log()
    (failure,) = [line for line in lines if line["message"] == "batch failed"]
    assert failure["level"] == "error"
    assert sorted(failure["request_ids"]) == sorted(["failing-rest", v2.headers["x-request-id"]])
    assert failure["trace_ids"] == [TRACE]  # the untraced request adds none
    assert failure["exception"].startswith("Traceback (most recent call last)")
    assert "RuntimeError: engine failure injected by the test" in failure["exception"]
    failed_requests = {line["request_id"] for line in lines if line["message"] == "request failed"}
    assert failed_requests == {"failing-rest", v2.headers["x-request-id"]}


def corrupted_copy(bundle: Path, into: Path) -> Path:
    """A copy of `bundle` whose model.onnx has one byte changed (same size)."""
    copy = shutil.copytree(bundle, into / bundle.name)
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return copy


def test_a_bundle_failing_its_sha256_check_stops_the_server_with_one_line(
    classifier_dir: Path, tmp_path: Path
) -> None:
    bundle = corrupted_copy(classifier_dir, tmp_path)
    finished = subprocess.run(
        [sys.executable, "-m", "service", "--model-dir", str(bundle), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert finished.returncode == 2
    assert finished.stdout == ""
    (line,) = finished.stderr.splitlines()
    assert line.startswith(f"hornet serve: {bundle / 'model.onnx'}: sha256 ")
    assert "does not match" in line and "manifest.json" in line


class WrongShapeEngine(InstrumentedEngine):
    """Answers with logits of the wrong shape: the route's answer-building then raises an
    exception that is not one of the service's errors (an unexpected 500)."""

    def run(self, inputs):
        outputs = super().run(inputs)
        return {name: value[..., :0] for name, value in outputs.items()}


async def test_an_unexpected_error_answers_500_with_the_request_id(classifier_dir) -> None:
    """Starlette handles unexpected exceptions outside every middleware: the request's
    id still reaches the body, the X-Request-ID header and the log line."""
    from service.app import create_app
    from tests.helpers.serving import test_settings

    app = create_app(
        test_settings([classifier_dir]),
        engine_factory=lambda bundle, settings: WrongShapeEngine(create_engine(bundle, settings)),
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with anyio.fail_after(20):
                while (await client.get("/readyz")).status_code != 200:
                    await anyio.sleep(0.01)
            response = await client.post(
                "/classify",
                files=upload(encode(np.zeros((32, 32, 3), np.uint8))),
                headers={"X-Request-ID": "unexpected-1"},
            )
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal_error" and body["request_id"] == "unexpected-1"
    assert response.headers["x-request-id"] == "unexpected-1"


async def test_engines_failing_in_a_row_turn_the_server_not_ready(classifier_dir) -> None:
    """--max-engine-failures 3: two failed batches, a good one (the count starts again),
    two failed: still ready; the third in a row: not ready, naming why."""
    factory = InstrumentedFactory()
    async with serving(
        [classifier_dir], engine_factory=factory, max_batch_size=1, max_engine_failures=3
    ) as client:
        (engine,) = factory.engines

        async def classify(fail: bool) -> int:
            engine.fail = fail
            answer = await client.post("/v2/models/tiny_cls/infer", json=v2_image_request())
            return answer.status_code

        statuses = [await classify(fail) for fail in (True, True, False, True, True)]
        ready_before = (await client.get("/readyz")).status_code
        statuses.append(await classify(True))
        readyz = await client.get("/readyz")
        v2_ready = await client.get("/v2/health/ready")
        refused = await client.post("/v2/models/tiny_cls/infer", json=v2_image_request())
        metrics = (await client.get("/metrics")).text
    assert statuses == [500, 500, 200, 500, 500, 500]
    assert ready_before == 200
    assert readyz.status_code == 503 and readyz.json()["status"] == "not_ready"
    assert "3 batches in a row failed" in readyz.json()["detail"]
    assert "--max-engine-failures" in readyz.json()["detail"]
    assert v2_ready.status_code == 503
    assert refused.status_code == 503 and "3 batches in a row" in refused.json()["error"]
    assert 'hornet_engine_failures_total{model="tiny_cls"} 5.0' in metrics


async def test_without_the_setting_failing_engines_never_turn_the_server_not_ready(
    classifier_dir,
) -> None:
    factory = InstrumentedFactory()
    async with serving([classifier_dir], engine_factory=factory, max_batch_size=1) as client:
        factory.engines[0].fail = True
        for _ in range(12):
            answer = await client.post("/v2/models/tiny_cls/infer", json=v2_image_request())
            assert answer.status_code == 500
        assert (await client.get("/readyz")).status_code == 200


def batch_of_one_classifier(directory: Path) -> Path:
    """The test classifier with its logits reshaped to [1, classes]: a batch of one runs,
    a batch of two fails in ONNX Runtime (two rows do not reshape into one), so a real
    server warms up at batch size 1 and then fails every batch of two."""
    import onnx
    from onnx import helper, numpy_helper

    from tests.helpers import bundles

    model = onnx.load_from_string(bundles.classifier_onnx(224))
    graph = model.graph
    (gemm,) = [node for node in graph.node if node.op_type == "Gemm"]
    gemm.output[0] = "rows"
    shape = np.array([1, bundles.NUM_CLASSES], dtype=np.int64)
    graph.initializer.append(numpy_helper.from_array(shape, "one_row"))
    graph.node.append(helper.make_node("Reshape", ["rows", "one_row"], ["logits"]))
    return bundles.write_bundle(
        directory,
        name="one_row_cls",
        task="classify",
        onnx_bytes=model.SerializeToString(),
        preprocess=bundles.classify_preprocess(224),
        labels=bundles.LABELS,
        inputs=[{"name": "image", "dtype": "uint8", "shape": [-1, 224, 224, 3],
                 "layout": "NHWC"}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, bundles.NUM_CLASSES]}],
    )  # fmt: skip


def test_a_real_server_whose_engine_keeps_failing_exits_with_status_1(photos, tmp_path) -> None:
    """A real process, --max-engine-failures 2: pairs of requests batched together fail in
    the engine; after the second such batch the server drains and exits with status 1
    for its supervisor to restart it, naming why."""
    from concurrent.futures import ThreadPoolExecutor

    from service.testing import running_server

    bundle = batch_of_one_classifier(tmp_path / "one_row_cls")
    flags = ["--model-dir", str(bundle), "--engine-threads", "1", "--max-batch-size", "2",
             "--max-delay-ms", "2000", "--no-close-batches-early",
             "--warmup-batch-sizes", "one", "--max-engine-failures", "2"]  # fmt: skip
    image = encode(photos["chelsea"], "JPEG", quality=90)
    log = tmp_path / "server.log"
    with running_server(flags, log_path=log, inherit_settings=False) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:

            def classify(_: int) -> int:
                return http.post("/classify", files=upload(image)).status_code

            with ThreadPoolExecutor(2) as pool:
                first = list(pool.map(classify, range(2)))
                second = list(pool.map(classify, range(2)))
        status = server.process.wait(60)
    assert first == [500, 500] and second == [500, 500]
    assert status == 1
    text = log.read_text()
    assert "2 batches in a row failed in its engines" in text and "engines failing" in text
