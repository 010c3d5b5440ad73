"""Under concurrency: batches form, answers stay each image's own, overload is refused
cleanly, deadlines hold, failures stay contained, departed clients cost no engine time."""

from __future__ import annotations

import asyncio
import threading

import anyio
import numpy as np
import pytest

from tests.helpers.engines import InstrumentedFactory
from tests.helpers.images import encode, upload
from tests.helpers.serving import serving

pytestmark = pytest.mark.anyio


def distinct_images(photos, count: int) -> list[bytes]:
    """`count` different images: windows of the astronaut photo at shifted offsets."""
    array = photos["astronaut"]
    return [encode(array[17 * i : 17 * i + 300, 23 * i : 23 * i + 260]) for i in range(count)]


def assert_same_answer(got: dict, expected: dict) -> None:
    assert [e["index"] for e in got["top_k"]] == [e["index"] for e in expected["top_k"]]
    np.testing.assert_allclose(
        [e["score"] for e in got["top_k"]], [e["score"] for e in expected["top_k"]], rtol=1e-6
    )


async def _post_all(client, images: list[bytes]) -> list:
    with anyio.fail_after(60):
        return await asyncio.gather(
            *(client.post("/classify", params={"top_k": 10}, files=upload(i)) for i in images)
        )


async def test_concurrent_requests_form_batches_and_get_their_own_answers(
    classifier_dir, photos
) -> None:
    images = distinct_images(photos, 12)
    factory = InstrumentedFactory()
    async with serving(
        [classifier_dir], engine_factory=factory, max_batch_size=8, max_delay_ms=100
    ) as client:
        singles = []
        for image in images:
            response = await client.post("/classify", params={"top_k": 10}, files=upload(image))
            singles.append(response.json()["results"][0])
        warm_and_single = len(factory.batch_sizes)
        responses = await _post_all(client, images)
    concurrent_batches = factory.batch_sizes[warm_and_single:]
    assert max(concurrent_batches) > 1, concurrent_batches
    assert sum(concurrent_batches) == len(images)
    for response, single in zip(responses, singles, strict=True):
        assert response.status_code == 200
        assert_same_answer(response.json()["results"][0], single)


async def test_a_batch_waits_for_a_request_still_decoding_and_a_lone_one_runs_at_once(
    classifier_dir, photos
) -> None:
    """--close-batches-early (the default): with a 20 s delay, a request whose image is
    still being decoded holds the batch open, and nothing else does."""
    fast, slow = distinct_images(photos, 2)
    factory = InstrumentedFactory()
    decoding, finish_decoding = threading.Event(), threading.Event()
    async with serving(
        [classifier_dir],
        engine_factory=factory,
        max_batch_size=8,
        max_delay_ms=20_000,
        decode_threads=2,
    ) as client:
        runner = client.app.state.pool.runners["tiny_cls"]
        prepare_one = runner._prepare_one

        def held_for_the_slow_image(data: bytes):
            if data == slow:
                decoding.set()
                if not finish_decoding.wait(30):
                    raise TimeoutError("the test never let the decoding finish")
            return prepare_one(data)

        runner._prepare_one = held_for_the_slow_image
        before = len(factory.batch_sizes)
        try:
            with anyio.fail_after(15):  # far less than the delay
                held = asyncio.ensure_future(client.post("/classify", files=upload(slow)))
                await asyncio.to_thread(decoding.wait, 10)
                waiting = asyncio.ensure_future(client.post("/classify", files=upload(fast)))
                while runner.queue.depth < 1:  # decoded and queued
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.5)
                assert not waiting.done() and runner.queue.depth == 1  # still queued, not run:
                assert factory.batch_sizes[before:] == []  # its batch waits for the other image
                finish_decoding.set()
                answers = await asyncio.gather(held, waiting)
                assert factory.batch_sizes[before:] == [2]
                lone = await client.post("/classify", files=upload(fast))
        finally:
            finish_decoding.set()  # never leave the decoding thread held
        assert factory.batch_sizes[before:] == [2, 1]
    assert [a.status_code for a in (*answers, lone)] == [200, 200, 200]
    assert_same_answer(lone.json()["results"][0], answers[1].json()["results"][0])


async def test_overload_answers_503_with_retry_after_and_no_wrong_answers(
    classifier_dir, photos
) -> None:
    images = distinct_images(photos, 12)
    factory = InstrumentedFactory()
    async with serving(
        [classifier_dir],
        engine_factory=factory,
        max_batch_size=1,
        max_delay_ms=0,
        max_queue_size=2,
    ) as client:
        singles = [
            (await client.post("/classify", params={"top_k": 10}, files=upload(i))).json()
            for i in images
        ]
        engine = factory.engines[0]
        engine.hold()  # the first admitted request waits in the engine, the next fill the queue
        posts = [
            asyncio.ensure_future(client.post("/classify", params={"top_k": 10}, files=upload(i)))
            for i in images
        ]
        with anyio.fail_after(60):
            await asyncio.wait(posts, return_when=asyncio.FIRST_COMPLETED)  # a refusal
            engine.release()
            responses = await asyncio.gather(*posts)
    statuses = [r.status_code for r in responses]
    assert statuses.count(503) > 0 and statuses.count(200) > 0, statuses
    assert set(statuses) == {200, 503}
    for response, single in zip(responses, singles, strict=True):
        if response.status_code == 503:
            assert response.json()["error"] == "overloaded"
            assert int(response.headers["retry-after"]) >= 1
        else:
            assert_same_answer(response.json()["results"][0], single["results"][0])


async def test_request_past_its_deadline_is_504(classifier_dir, photos) -> None:
    factory = InstrumentedFactory()
    async with serving(
        [classifier_dir], engine_factory=factory, request_timeout_s=0.2, drain_timeout_s=2
    ) as client:
        factory.engines[0].hold()  # the request is still in the engine at its deadline
        response = await client.post("/classify", files=upload(encode(photos["coffee"])))
        factory.engines[0].release()
    assert response.status_code == 504
    assert response.json()["error"] == "timeout" and "deadline" in response.json()["detail"]


async def test_engine_error_fails_its_requests_with_500_and_the_service_stays_up(
    classifier_dir, photos
) -> None:
    factory = InstrumentedFactory()
    image = encode(photos["coffee"])
    async with serving([classifier_dir], engine_factory=factory) as client:
        factory.engines[0].fail = True
        failed = await client.post("/classify", files=upload(image))
        factory.engines[0].fail = False
        recovered = await client.post("/classify", files=upload(image))
        metrics = (await client.get("/metrics")).text
    assert failed.status_code == 500 and failed.json()["error"] == "engine_error"
    assert "injected by the test" in failed.json()["detail"]
    assert recovered.status_code == 200
    assert 'hornet_engine_failures_total{model="tiny_cls"} 1.0' in metrics


async def test_request_of_a_departed_client_never_reaches_the_engine(
    classifier_dir, photos
) -> None:
    factory = InstrumentedFactory()
    body = encode(photos["coffee"])
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/classify",
        "raw_path": b"/classify",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "headers": [(b"content-type", b"image/png"), (b"content-length", b"%d" % len(body))],
    }
    async with serving([classifier_dir], engine_factory=factory) as client:
        engine_calls = len(factory.batch_sizes)
        with anyio.fail_after(10):
            await client.app(scope, receive, send)
        assert len(factory.batch_sizes) == engine_calls
    assert sent[0]["status"] == 499
