"""A request whose deadline the queue's work ahead would outlast is shed at once with
QueueFull (503 + Retry-After) instead of holding a place until it times out (504)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from service.batching import BatchQueue, BatchStats, DeadlineExceeded, QueueFull
from tests.helpers.waiting import raised_before_waiting

pytestmark = pytest.mark.anyio
ITEM_SECONDS = 0.05


def _slow_worker(release: threading.Event):
    def run(items: list[int]) -> list[int]:
        release.wait(10)
        time.sleep(ITEM_SECONDS * len(items))  # stands for the engine's compute time
        return items

    return run


class _ComputeTimes:
    """Observer keeping each batch's compute seconds per item."""

    def __init__(self) -> None:
        self.per_item: list[float] = []

    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, stats: BatchStats) -> None:
        self.per_item.append(stats.compute_seconds / stats.size)


async def _seeded_queue(
    release: threading.Event, observer: _ComputeTimes | None = None
) -> BatchQueue[int, int]:
    """A queue that has run one batch, so it knows its compute time per item."""
    queue: BatchQueue[int, int] = BatchQueue(
        [_slow_worker(release)],
        max_batch_size=4,
        max_delay_s=0.0,
        max_queue_size=64,
        observer=observer,
    )
    queue.start()
    release.set()
    assert await queue.submit(0) == 0
    release.clear()
    return queue


async def test_the_expected_wait_counts_the_work_ahead() -> None:
    """4 items with nothing ahead: 4 times the compute time per item the first batch
    took, as measured (a loaded host stretches the worker's sleep, never shortens it)."""
    release = threading.Event()
    observer = _ComputeTimes()
    queue = await _seeded_queue(release, observer)
    estimate = queue.expected_wait_s(4)
    (measured,) = observer.per_item
    assert 4 * ITEM_SECONDS <= estimate == pytest.approx(4 * measured, rel=0.1)
    release.set()
    await queue.close(1.0)


async def test_a_request_that_could_only_time_out_is_refused_at_once() -> None:
    release = threading.Event()
    queue = await _seeded_queue(release)
    async with anyio.create_task_group() as group:
        for item in range(1, 21):  # about 1 s of work ahead, held until released
            group.start_soon(lambda i=item: queue.submit(i, deadline=time.monotonic() + 30))
        await anyio.sleep(0)
        while queue.work_ahead() < 20:
            await anyio.sleep(0.001)
        # refused at once, not after its 0.2 s
        refused = raised_before_waiting(queue.submit(99, deadline=time.monotonic() + 0.2))
        assert isinstance(refused, QueueFull) and "past this request's deadline" in str(refused)
        assert await _admitted_with_room(queue, release)
    await queue.close(1.0)


async def _admitted_with_room(queue: BatchQueue[int, int], release: threading.Event) -> bool:
    """With a deadline the work ahead fits in, the request is queued and answered."""
    release.set()
    return await queue.submit(7, deadline=time.monotonic() + 30) == 7


async def test_without_a_measurement_nothing_is_refused_for_time() -> None:
    release = threading.Event()
    queue: BatchQueue[int, int] = BatchQueue(
        [_slow_worker(release)], max_batch_size=4, max_delay_s=0.0, max_queue_size=64
    )
    queue.start()
    assert queue.expected_wait_s(1) is None
    with pytest.raises(DeadlineExceeded):
        await queue.submit(1, deadline=time.monotonic() + 0.05)
    release.set()
    await queue.close(1.0)
