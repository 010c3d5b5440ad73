"""A client's own deadline, where sooner than --request-timeout-s: Triton's `timeout`
request parameter (microseconds; tritonclient's `infer(..., timeout=N)`) over v2 REST
and gRPC, and the image routes' `timeout_ms`. A real server with a model slow enough for
requests to queue: a deadline the work queued ahead would outlast is refused at once
(503 with Retry-After, its image never run), a generous one is answered, a malformed one
is a 4xx."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from service.testing import free_port, running_server
from tests.helpers.queueing import metric, queued_photo

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TIMEOUT_S = 60
QUEUED = 10


def _queue_depth(url: str) -> float:
    return metric(url, 'hornet_queue_depth{model="slow_cls"}')


def test_a_deadline_the_queue_would_outlast_is_refused_at_once(slow_classifier_dir, tmp_path):
    grpc_port = free_port()
    log = tmp_path / "server.log"
    image = queued_photo(9)
    headers = {"content-type": "image/jpeg"}
    with running_server(
        [
            "--model-dir", str(slow_classifier_dir), "--grpc-port", str(grpc_port),
            "--instances", "1", "--engine-threads", "1", "--max-batch-size", "1",
            "--log-level", "debug",
        ],
        log_path=log,
        inherit_settings=False,
    ) as running:  # fmt: skip
        url = f"{running.url}/classify"
        # the engine's time per image measured (the admission's estimate needs it)
        assert httpx.post(url, content=image, headers=headers, timeout=TIMEOUT_S).status_code == 200
        statuses: list[int] = []

        def bulk() -> None:
            answer = httpx.post(url, content=image, headers=headers, timeout=TIMEOUT_S)
            statuses.append(answer.status_code)

        threads = [threading.Thread(target=bulk) for _ in range(QUEUED)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while _queue_depth(running.url) < QUEUED - 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        # about 45 ms per image and 7 or more queued: 50 ms cannot be met
        short = httpx.post(f"{url}?timeout_ms=50", content=image, headers=headers)
        rest = httpclient.InferenceServerClient(running.url.removeprefix("http://"))
        remote = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        refusals = []
        for module, client in ((httpclient, rest), (grpcclient, remote)):
            tensor = module.InferInput("encoded_image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
            with pytest.raises(InferenceServerException) as refused:
                client.infer("slow_cls", [tensor], timeout=50_000)  # microseconds
            refusals.append(refused.value)
            # a generous deadline is kept
            answer = client.infer("slow_cls", [tensor], timeout=30_000_000)
            assert answer.as_numpy("probabilities").shape == (1, 10)
        generous = httpx.post(f"{url}?timeout_ms=30000", content=image, headers=headers)
        for thread in threads:
            thread.join(TIMEOUT_S)
        malformed = [
            httpx.post(f"{url}?timeout_ms={value}", content=image, headers=headers).status_code
            for value in ("0", "-5", "soon", "9" * 400)  # the last once a 500 (OverflowError)
        ]
        v2 = [
            httpx.post(
                f"{running.url}/v2/models/slow_cls/infer",
                json={
                    "parameters": {"timeout": value},
                    "inputs": [
                        {
                            "name": "encoded_image",
                            "datatype": "BYTES",
                            "shape": [1],
                            "data": ["not read"],
                        }
                    ],
                },
            )  # fmt: skip
            for value in ("50", -1, 1.5, True, 2**64, 10**400)  # Triton's uint64; 10**400
        ]  # was a 500: no float holds it
    assert short.status_code == 503 and short.json()["error"] == "overloaded"
    assert "past this request's deadline" in short.json()["detail"]
    assert short.headers["retry-after"] == "1"
    assert refusals[0].status() == "503" and "deadline" in refusals[0].message()
    assert refusals[1].status() == "StatusCode.UNAVAILABLE"
    assert generous.status_code == 200 and statuses == [200] * QUEUED
    assert malformed == [422, 422, 422, 422]
    for answer in v2:
        assert answer.status_code == 400
        assert "parameters.timeout takes a whole number of microseconds" in answer.json()["error"]
    # the three refused at once never reached the engine: 1 + QUEUED + 2 + 1 batches ran
    ran = [
        line
        for line in map(json.loads, log.read_text().splitlines())
        if line.get("message") == "batch ran"
    ]
    assert len(ran) == 1 + QUEUED + 2 + 1
