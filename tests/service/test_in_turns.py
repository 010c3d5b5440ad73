"""`service.runtime.in_turns`, which runs a request's decoding and the making of its
answers: at most `window` of its items started and not finished at once, results in
order, and nothing more started once one fails, the deadline passes or the client goes;
checked against those definitions with items whose start and end the test controls,
then on the app's /segment route, whose answers (a mask at the upload's size each) are
made this way. The real-server decoding cases are in test_decode_bounds.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from service.errors import Timeout
from service.runtime import ClientDisconnected, in_turns
from tests.helpers.demo import bundle_dir, uploads
from tests.helpers.serving import serving

pytestmark = pytest.mark.anyio


class Items:
    """Items that end when the test says: `started` in order, at most `peak` at once."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.running = 0
        self.peak = 0
        self.ends: dict[int, asyncio.Future] = {}

    async def start(self, item: int) -> str:
        self.started.append(item)
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.ends[item] = asyncio.get_running_loop().create_future()
        try:
            return await self.ends[item]
        finally:
            self.running -= 1

    async def end(self, item: int, result: str | Exception) -> None:
        while item not in self.ends:
            await asyncio.sleep(0)
        if isinstance(result, Exception):
            self.ends[item].set_exception(result)
        else:
            self.ends[item].set_result(result)


async def test_at_most_the_window_run_at_once_and_the_results_keep_their_order() -> None:
    items = Items()
    run = asyncio.ensure_future(
        in_turns(items.start, range(7), window=3, deadline=None, is_gone=None, doing="x")
    )
    for item in (2, 0, 4, 1, 3, 6, 5):  # out of order, each once it has started
        await items.end(item, f"r{item}")
    assert await run == [f"r{n}" for n in range(7)]
    assert items.peak == 3 and items.started == list(range(7))


async def test_a_failure_starts_nothing_more_and_cancels_what_has_not_begun() -> None:
    items = Items()
    run = asyncio.ensure_future(
        in_turns(items.start, range(10), window=2, deadline=None, is_gone=None, doing="x")
    )
    await items.end(0, ValueError("item 0 is bad"))
    with pytest.raises(ValueError, match="item 0 is bad"):
        await run
    assert items.started == [0, 1]  # item 1 was running; 2..9 never started
    assert items.running == 0  # item 1 cancelled


async def test_a_passed_deadline_is_a_timeout_naming_what_was_being_done() -> None:
    items = Items()
    deadline = time.monotonic() + 0.2
    with pytest.raises(Timeout, match="deadline passed while its 5 images were decoded"):
        await in_turns(
            items.start, range(5), window=2, deadline=deadline, is_gone=None,
            doing="its 5 images were decoded",
        )  # fmt: skip
    assert items.started == [0, 1]


async def test_a_departed_client_stops_it_before_the_next_item_starts() -> None:
    items, asked = Items(), []

    async def gone() -> bool:
        asked.append(len(items.started))
        return len(items.started) >= 3

    run = asyncio.ensure_future(
        in_turns(items.start, range(6), window=1, deadline=None, is_gone=gone, doing="x")
    )
    for item in range(3):
        await items.end(item, "ok")
    with pytest.raises(ClientDisconnected):
        await run
    assert items.started == [0, 1, 2] and asked == [1, 2, 3]


SLOW_MASK_S = 0.3
IMAGES = [np.full((64, 96, 3), 30 * n, dtype=np.uint8) for n in range(8)]


def _masks_made_slowly(client) -> list[float]:
    """The demo segmenter's masks made in SLOW_MASK_S each; the list gets the time each
    is done."""
    pipeline = client.app.state.pool.runners["shapes_segment"].pipeline
    made, lock, real = [], threading.Lock(), pipeline.finish

    def slow_finish(prepared, results, options):
        time.sleep(SLOW_MASK_S)
        with lock:
            made.append(time.monotonic())
        return real(prepared, results, options)

    pipeline.finish = slow_finish
    return made


async def test_segment_answers_are_made_in_turns_and_stop_at_the_deadline() -> None:
    """Each mask made in 0.3 s (a stand-in for a photograph's at 36 megapixels, about 2
    s): 8 images with a 1 s deadline are answered 504 once it passes, and at most the two
    begun then are made after it (before, all 8 were handed to threads at once after the
    engine and made whatever the deadline)."""
    async with serving([bundle_dir("segment")], decode_threads=2) as client:
        made = _masks_made_slowly(client)
        asked = time.monotonic()
        answer = await client.post(
            "/segment", params={"timeout_ms": 1000}, files=uploads(IMAGES), timeout=30
        )
        answered = time.monotonic()
        await asyncio.sleep(0.8)  # those begun finish
    assert answer.status_code == 504, answer.text[:300]
    assert "deadline passed while its 8 answers were made" in answer.json()["detail"]
    assert answered - asked < 2.0
    assert len(made) < 8
    assert sum(t > answered for t in made) <= 2


async def test_v2_segment_answers_are_made_in_turns_too() -> None:
    """The same over v2, a segmenter's encoded-image tensor of 8 images: 504 once the
    deadline has passed (before, the 8 masks were made in one thread call whatever it)."""
    from tests.helpers.images import encode

    async with serving([bundle_dir("segment")], decode_threads=2) as client:
        made = _masks_made_slowly(client)
        images = [encode(image, "PNG") for image in IMAGES]
        body = {
            "parameters": {"timeout": 1_000_000},  # microseconds
            "inputs": [{"name": "encoded_image", "datatype": "BYTES", "shape": [8, 1],
                        "parameters": {"binary_data_size": 0}}],
        }  # fmt: skip
        binary = b"".join(len(i).to_bytes(4, "little") + i for i in images)
        body["inputs"][0]["parameters"]["binary_data_size"] = len(binary)
        header = json.dumps(body).encode()
        asked = time.monotonic()
        answer = await client.post(
            "/v2/models/shapes_segment/infer",
            content=header + binary,
            headers={"Inference-Header-Content-Length": str(len(header))},
            timeout=30,
        )
        answered = time.monotonic()
        await asyncio.sleep(0.8)
    assert answer.status_code == 504, answer.text[:300]
    assert "deadline passed while its 8 answers were made" in answer.json()["error"]
    assert answered - asked < 2.0
    assert len(made) < 8 and sum(t > answered for t in made) <= 2
