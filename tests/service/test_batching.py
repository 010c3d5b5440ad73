"""The batcher alone: batch forming, overload, deadlines, departed clients, failures."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import pytest

from service.batching import (
    BatchFailed,
    BatchObservers,
    BatchQueue,
    BatchStats,
    ClientGone,
    DeadlineExceeded,
    QueueClosed,
    QueueFull,
    Timing,
)
from tests.helpers.waiting import raised_before_waiting

pytestmark = pytest.mark.anyio


async def within(awaitable, seconds: float = 5.0):
    """Await with a bound, so a batcher bug fails the test instead of hanging the run."""
    return await asyncio.wait_for(awaitable, seconds)


class Recorder:
    """Observer keeping every batch's stats and every queue depth it is told."""

    def __init__(self) -> None:
        self.batches: list[BatchStats] = []
        self.depths: list[int] = []
        self._told = asyncio.Event()

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)
        self._told.set()

    def batch_done(self, stats: BatchStats) -> None:
        self.batches.append(stats)

    async def depth_becomes(self, depth: int) -> None:
        """Return once the queue says it holds `depth` items."""
        while not (self.depths and self.depths[-1] == depth):
            self._told.clear()
            await within(self._told.wait())


def doubler(seen: list[list[int]] | None = None):
    def run(items: list[int]) -> list[int]:
        if seen is not None:
            seen.append(list(items))
        return [2 * item for item in items]

    return run


class HeldWorker:
    """A doubling worker that holds each batch until the test releases it; `entered` is
    set once a batch has reached it."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.seen.append(list(items))
        self.entered.set()
        if not self.released.wait(5):
            raise TimeoutError("the test never released the worker")
        return [2 * item for item in items]

    async def wait_entered(self) -> None:
        assert await within(asyncio.to_thread(self.entered.wait, 5)), "no batch reached it"


def _queue(workers, **overrides) -> BatchQueue:
    options = dict(max_batch_size=8, max_delay_s=0.02, max_queue_size=64, observer=Recorder())
    options.update(overrides)
    queue = BatchQueue(workers, **options)
    queue.start()
    return queue


async def test_concurrent_items_form_batches_and_get_their_own_results() -> None:
    seen: list[list[int]] = []
    queue = _queue([doubler(seen)], max_batch_size=8, max_delay_s=0.05)
    results = await within(asyncio.gather(*(queue.submit(i) for i in range(20))))
    assert results == [2 * i for i in range(20)]
    assert max(len(batch) for batch in seen) == 8
    assert sorted(item for batch in seen for item in batch) == list(range(20))
    await within(queue.close(1.0))


async def test_a_lone_item_waits_at_most_the_delay() -> None:
    recorder = Recorder()
    queue = _queue([doubler()], max_batch_size=64, max_delay_s=0.05, observer=recorder)
    started = time.monotonic()
    assert await within(queue.submit(3)) == 6
    assert 0.04 <= time.monotonic() - started < 1.0
    await within(queue.close(1.0))
    assert [(b.size, b.closed_by) for b in recorder.batches] == [(1, "delay")]


async def test_closing_early_a_lone_item_runs_without_waiting_the_delay() -> None:
    recorder = Recorder()
    queue = _queue(
        [doubler()], max_batch_size=64, max_delay_s=30.0, close_early=True, observer=recorder
    )
    assert await within(queue.submit(3), 5.0) == 6  # the delay would be 30 s
    await within(queue.close(1.0))
    assert [(b.size, b.closed_by) for b in recorder.batches] == [(1, "early")]


async def test_closing_early_a_batch_waits_for_announced_items() -> None:
    seen: list[list[int]] = []
    recorder = Recorder()
    queue = _queue(
        [doubler(seen)], max_batch_size=8, max_delay_s=30.0, close_early=True, observer=recorder
    )
    with queue.announce(), queue.announce():  # two requests being decoded
        first = asyncio.ensure_future(queue.submit(1))
        await asyncio.sleep(0.3)
        assert not first.done()  # the batch stays open for the announced item
        second = asyncio.ensure_future(queue.submit(2))
        await asyncio.sleep(0.1)
        assert not first.done()  # one announcement is still held
    assert await within(asyncio.gather(first, second)) == [2, 4]
    assert seen == [[1, 2]]
    await within(queue.close(1.0))
    assert [b.closed_by for b in recorder.batches] == ["early"]


async def test_closing_early_an_announcement_holds_a_batch_no_longer_than_the_delay() -> None:
    recorder = Recorder()
    queue = _queue(
        [doubler()], max_batch_size=8, max_delay_s=0.2, close_early=True, observer=recorder
    )
    with queue.announce():  # a decode that never ends
        started = time.monotonic()
        assert await within(queue.submit(3)) == 6
        assert 0.15 <= time.monotonic() - started < 5.0
    await within(queue.close(1.0))
    assert [b.closed_by for b in recorder.batches] == ["delay"]


async def test_without_closing_early_announcements_change_nothing() -> None:
    seen: list[list[int]] = []
    queue = _queue([doubler(seen)], max_batch_size=8, max_delay_s=0.3)
    started = time.monotonic()
    first = asyncio.ensure_future(queue.submit(1))
    with queue.announce():
        await asyncio.sleep(0.05)
    assert await within(first) == 2
    assert time.monotonic() - started >= 0.25  # waited the whole delay, announced or not
    await within(queue.close(1.0))


async def test_submit_many_returns_results_in_item_order() -> None:
    seen: list[list[int]] = []
    queue = _queue([doubler(seen)], max_batch_size=3)
    assert await within(queue.submit_many([5, 6, 7, 8, 9])) == [10, 12, 14, 16, 18]
    assert len(seen) >= 2  # split across batches
    await within(queue.close(1.0))


async def test_instances_run_batches_in_parallel() -> None:
    active, peak, lock = [0], [0], threading.Lock()
    both_running = threading.Event()

    def held_until_both_run(items: list[int]) -> list[int]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] == 2:
                both_running.set()
        both_running.wait(2)
        with lock:
            active[0] -= 1
        return items

    queue = _queue([held_until_both_run, held_until_both_run], max_batch_size=2, max_delay_s=0.0)
    await within(asyncio.gather(*(queue.submit(i) for i in range(8))))
    assert peak[0] == 2
    await within(queue.close(1.0))


async def test_full_queue_refuses_at_once() -> None:
    worker, recorder = HeldWorker(), Recorder()
    queue = _queue([worker], max_batch_size=1, max_delay_s=0.0, max_queue_size=2, observer=recorder)
    running = [asyncio.ensure_future(queue.submit(0))]
    await worker.wait_entered()  # the first item is in the engine
    running += [asyncio.ensure_future(queue.submit(i)) for i in (1, 2)]
    await recorder.depth_becomes(2)  # two queued behind it
    refused = raised_before_waiting(queue.submit(99))
    assert isinstance(refused, QueueFull) and "queue holds 2 of 2" in str(refused)
    assert isinstance(raised_before_waiting(queue.submit_many([1, 2])), QueueFull)
    worker.released.set()
    assert await within(asyncio.gather(*running)) == [0, 2, 4]
    await within(queue.close(1.0))


async def test_request_past_its_deadline_times_out_and_never_runs() -> None:
    worker = HeldWorker()
    queue = _queue([worker], max_batch_size=1, max_delay_s=0.0)
    first = asyncio.ensure_future(queue.submit(1))
    await worker.wait_entered()  # the engine is busy with the first item
    with pytest.raises(DeadlineExceeded):
        await within(queue.submit(2, deadline=time.monotonic() + 0.05))
    worker.released.set()
    assert await within(first) == 2
    await within(queue.close(1.0))  # the expired item would have run by now
    assert worker.seen == [[1]]


async def test_departed_client_is_dropped_before_the_engine() -> None:
    seen: list[list[int]] = []
    queue = _queue([doubler(seen)], max_delay_s=0.02)

    async def gone() -> bool:
        return True

    async def here() -> bool:
        return False

    dropped = asyncio.ensure_future(queue.submit(1, is_gone=gone))
    kept = asyncio.ensure_future(queue.submit(2, is_gone=here))
    with pytest.raises(ClientGone):
        await within(dropped)
    assert await within(kept) == 4
    assert seen == [[2]]
    await within(queue.close(1.0))


async def test_engine_error_fails_only_its_batch() -> None:
    def flaky(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("engine exploded")
        return items

    recorder = Recorder()
    queue = _queue([flaky], max_batch_size=1, max_delay_s=0.0, observer=recorder)
    results = await within(
        asyncio.gather(queue.submit(12), queue.submit(13), queue.submit(14), return_exceptions=True)
    )
    assert results[0] == 12 and results[2] == 14
    assert isinstance(results[1], BatchFailed) and "engine exploded" in str(results[1])
    assert [b.failed for b in recorder.batches].count(True) == 1
    assert await within(queue.submit(15)) == 15
    await within(queue.close(1.0))


async def test_wrong_number_of_results_is_an_error_not_a_misalignment() -> None:
    queue = _queue([lambda items: items[:-1]], max_batch_size=4, max_delay_s=0.02)
    submitted = (queue.submit(i) for i in range(4))
    results = await within(asyncio.gather(*submitted, return_exceptions=True))
    assert all(isinstance(r, BatchFailed) for r in results)
    assert "returned 3 results for 4 inputs" in str(results[0])
    await within(queue.close(1.0))


async def test_observer_sees_batch_sizes_and_queue_times() -> None:
    recorder = Recorder()
    queue = _queue([doubler()], max_batch_size=4, max_delay_s=0.05, observer=recorder)
    await within(asyncio.gather(*(queue.submit(i) for i in range(4))))
    assert [(b.size, b.closed_by) for b in recorder.batches] == [(4, "full")]
    assert all(0 <= s < 1 for s in recorder.batches[0].queue_seconds)
    await within(queue.close(1.0))


async def one_running_three_queued(worker: HeldWorker) -> tuple[BatchQueue, list]:
    """A queue taking one item at a time, given items 0-3: the first held in `worker`,
    the other three waiting behind it."""
    recorder = Recorder()
    queue = _queue([worker], max_batch_size=1, max_delay_s=0.0, observer=recorder)
    pending = [asyncio.ensure_future(queue.submit(i)) for i in range(4)]
    await worker.wait_entered()
    await recorder.depth_becomes(3)
    return queue, pending


async def test_close_finishes_queued_work_then_refuses_new_work() -> None:
    worker = HeldWorker()
    queue, pending = await one_running_three_queued(worker)
    closing = asyncio.ensure_future(queue.close(5.0))
    worker.released.set()
    await within(closing)
    assert await within(asyncio.gather(*pending)) == [0, 2, 4, 6]
    with pytest.raises(QueueClosed):
        await within(queue.submit(1))


async def test_close_past_the_drain_bound_fails_what_is_left() -> None:
    worker = HeldWorker()
    queue, pending = await one_running_three_queued(worker)
    await within(queue.close(0.05))  # the engine still holds its batch
    worker.released.set()
    results = await within(asyncio.gather(*pending, return_exceptions=True))
    assert any(isinstance(r, QueueClosed) for r in results)
    assert all(r in (0, 2, 4, 6) or isinstance(r, QueueClosed) for r in results)


@pytest.mark.parametrize("dispatch_first", [True, False])
async def test_the_engine_gets_its_next_batch_before_the_last_answers_are_delivered(
    dispatch_first,
):
    """Items queued while a batch runs go to the engine before that batch's answers are
    delivered: an answer's continuation (an HTTP response) runs on the event loop, and
    the engine would otherwise wait for all of them. Each queued item is checked for a
    departed client as the service does (one suspension each, as Starlette's
    `is_disconnected`); the first answer's continuation then blocks the loop while it
    waits for the second batch to start in the engine's thread, which only
    `dispatch_first` has already handed over."""
    release, second = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def worker(items):
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)
        else:
            second.set()
        return items

    async def is_gone() -> bool:
        await asyncio.sleep(0)
        return False

    queue = BatchQueue(
        [worker], max_batch_size=8, max_delay_s=0.0, max_queue_size=16, close_early=True,
        dispatch_first=dispatch_first,
    )  # fmt: skip
    queue.start()
    queued = [f"q{i}" for i in range(8)]
    try:
        first = asyncio.ensure_future(queue.submit("a"))
        while not calls:
            await asyncio.sleep(0.001)
        rest = asyncio.ensure_future(queue.submit_many(queued, is_gone=is_gone))
        await asyncio.sleep(0.02)  # queued behind the running batch
        release.set()
        assert await within(first) == "a"
        started = second.wait(2.0)  # blocks the event loop, as a long answer would
        assert started is dispatch_first
        assert await within(rest) == queued
        assert calls == [["a"], queued]
    finally:
        await queue.close(1.0)


@pytest.mark.parametrize("workers", [1, 2])
async def test_answers_do_not_wait_when_nothing_is_queued(monkeypatch, workers):
    """With nothing queued the answers go out at once, one engine or two (the other one
    idle, the batch former waiting for items): never after the hand-off's safety net,
    made 30 s here so that waiting for it would fail the test."""
    import service.batching

    monkeypatch.setattr(service.batching, "HANDOFF_WAIT_S", 30.0)
    queue = BatchQueue(
        [lambda items: items] * workers, max_batch_size=4, max_delay_s=0.0,
        max_queue_size=16, close_early=True,
    )  # fmt: skip
    queue.start()
    try:
        for item in "abc":
            assert await within(queue.submit(item), 2.0) == item
    finally:
        await queue.close(1.0)


class Overlap:
    """Wraps workers to record, per run, which other workers were running at its start
    and whether any two ever ran at once with the solo worker among them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: set[str] = set()
        self.solo_overlapped = False

    def wrap(self, name: str, worker):
        def run(items: list[int]) -> list[int]:
            with self.lock:
                self.active.add(name)
                if "solo" in self.active and len(self.active) > 1:
                    self.solo_overlapped = True
            try:
                return worker(items)
            finally:
                with self.lock:
                    self.active.discard(name)

        return run


async def test_a_lone_item_on_an_idle_queue_runs_on_the_solo_engine() -> None:
    instances, solo, recorder = [], [], Recorder()
    queue = _queue(
        [doubler(instances), doubler(instances)],
        solo=doubler(solo),
        close_early=True,
        observer=recorder,
    )
    assert await within(queue.submit(3)) == 6
    assert await within(queue.submit(4)) == 8  # the queue idle again: solo again
    assert solo == [[3], [4]] and instances == []
    # Two items at once: split over the two idle instances, one each.
    assert await within(queue.submit_many([5, 6])) == [10, 12]
    assert sorted(instances) == [[5], [6]]
    await within(queue.close(1.0))
    assert [(b.size, b.solo) for b in recorder.batches] == [(1, True), (1, True)] + [(1, False)] * 2


async def test_the_solo_engine_runs_alone_and_what_comes_meanwhile_goes_to_the_instances() -> None:
    overlap, solo = Overlap(), HeldWorker()
    seen_a: list[list[int]] = []
    seen_b: list[list[int]] = []
    queue = _queue(
        [overlap.wrap("a", doubler(seen_a)), overlap.wrap("b", doubler(seen_b))],
        solo=overlap.wrap("solo", solo),
        max_batch_size=2,
        max_delay_s=0.0,
    )
    first = asyncio.ensure_future(queue.submit(1))
    await solo.wait_entered()
    later = [asyncio.ensure_future(queue.submit(i)) for i in (2, 3, 4, 5, 6)]
    await asyncio.sleep(0.2)
    assert seen_a == seen_b == []  # no instance runs while the solo engine does
    assert not any(task.done() for task in later)
    solo.released.set()
    assert await within(first) == 2
    assert await within(asyncio.gather(*later)) == [4, 6, 8, 10, 12]
    # The queued items went to the instances, in batches of 2; the last one alone may
    # find them both idle again, and then runs on the solo engine.
    ran = sorted(map(sorted, seen_a + seen_b))
    assert ran[:2] == [[2, 3], [4, 5]] and ran[2:] + solo.seen[1:] == [[6]]
    assert solo.seen[0] == [1]
    assert not overlap.solo_overlapped
    await within(queue.close(1.0))


async def test_the_solo_engine_waits_while_an_instance_runs() -> None:
    held, solo = HeldWorker(), []
    queue = _queue([held, doubler()], solo=doubler(solo), max_batch_size=8, max_delay_s=0.0)
    busy = asyncio.ensure_future(queue.submit_many([1, 2]))  # a batch of 2: an instance
    await held.wait_entered()
    assert await within(queue.submit(3)) == 6  # one instance busy: the other runs it
    assert solo == []
    held.released.set()
    assert await within(busy) == [2, 4]
    await within(queue.close(1.0))


async def test_an_announced_item_keeps_a_lone_item_off_the_solo_engine() -> None:
    instances, solo = [], []
    queue = _queue([doubler(instances), doubler(instances)], solo=doubler(solo), max_delay_s=0.05)
    with queue.announce():  # another request is being decoded: more work is coming
        assert await within(queue.submit(3)) == 6
    assert instances == [[3]] and solo == []
    await within(queue.close(1.0))


async def test_a_failing_solo_engine_fails_only_its_batch() -> None:
    calls = []

    def fails_once(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("solo engine broke")
        return [2 * item for item in items]

    recorder = Recorder()
    queue = _queue([doubler(), doubler()], solo=fails_once, observer=recorder, max_delay_s=0.0)
    with pytest.raises(BatchFailed, match="solo engine broke"):
        await within(queue.submit(1))
    assert await within(queue.submit(2)) == 4  # the next lone item runs there again
    assert await within(asyncio.gather(*(queue.submit(i) for i in range(6)))) == [
        2 * i for i in range(6)
    ]
    await within(queue.close(1.0))
    assert [(b.solo, b.failed) for b in recorder.batches][:2] == [(True, True), (True, False)]


async def test_closing_fails_the_item_on_the_solo_engine_and_does_not_hang() -> None:
    solo = HeldWorker()
    queue = _queue([doubler(), doubler()], solo=solo, max_delay_s=0.0)
    item = asyncio.ensure_future(queue.submit(1))
    await solo.wait_entered()
    await within(queue.close(0.1))
    with pytest.raises(QueueClosed):
        await within(item)
    solo.released.set()


async def test_items_at_once_are_split_over_the_idle_instances() -> None:
    seen_a: list[list[int]] = []
    seen_b: list[list[int]] = []
    recorder = Recorder()
    queue = _queue([doubler(seen_a), doubler(seen_b)], max_batch_size=8, observer=recorder)
    assert await within(queue.submit_many(list(range(8)))) == [2 * i for i in range(8)]
    assert sorted(map(len, seen_a + seen_b)) == [4, 4]
    await within(queue.close(1.0))
    assert sorted(b.closed_by for b in recorder.batches) == ["delay", "split"]


async def test_a_busy_instance_leaves_the_queued_items_to_the_free_one() -> None:
    held, seen = HeldWorker(), []
    queue = _queue([held, doubler(seen)], max_batch_size=8, max_delay_s=0.0)
    busy = asyncio.ensure_future(queue.submit(1))
    await held.wait_entered()
    assert await within(queue.submit_many([2, 3, 4, 5])) == [4, 6, 8, 10]
    assert seen == [[2, 3, 4, 5]]  # no other instance idle: no split
    held.released.set()
    assert await within(busy) == 2
    await within(queue.close(1.0))


async def test_closed_loop_clients_keep_both_instances_busy() -> None:
    """8 clients, each decoding (announced) then waiting for its answer, over two
    instances whose run takes 20 ms per item: they settle into two groups taking
    turns. Without the split, the 8 first requests, announced together, became one batch
    and so did every next round of them, the other instance idle."""
    overlap = Overlap()
    per_item = 0.02

    def slow(items: list[int]) -> list[int]:
        time.sleep(per_item * len(items))
        return items

    runs: list[str] = []

    def named(name: str):
        inner = overlap.wrap(name, slow)

        def run(items: list[int]) -> list[int]:
            runs.append(name)
            return inner(items)

        return run

    recorder = Recorder()
    queue = _queue(
        [named("a"), named("b")],
        max_batch_size=8,
        max_delay_s=0.05,
        close_early=True,
        observer=recorder,
    )
    stop = time.monotonic() + 2.0

    async def client(index: int) -> None:
        while time.monotonic() < stop:
            with queue.announce():
                await asyncio.sleep(0.002)  # decoding
                waiting = queue.submit(index)
            await waiting

    await within(asyncio.gather(*(client(i) for i in range(8))), 20)
    await within(queue.close(1.0))
    assert runs.count("a") >= len(runs) / 3 and runs.count("b") >= len(runs) / 3
    # Groups of about 4 (sizes drift on a busy host), never the one group of 8.
    assert statistics.median(b.size for b in recorder.batches) <= 5


async def test_a_lone_item_over_idle_instances_closes_early_not_split() -> None:
    recorder = Recorder()
    queue = _queue([doubler(), doubler()], close_early=True, observer=recorder)
    assert await within(queue.submit(1)) == 2
    await within(queue.close(1.0))
    assert [b.closed_by for b in recorder.batches] == ["early"]


async def test_timing_splits_a_calls_wait_from_its_batches_runs() -> None:
    """Two items, one engine taking 50 ms a batch of one: the call waited for the first
    batch to run before its second item began, and then for the second batch's run."""
    run_s = 0.05

    def slow(items: list[int]) -> list[int]:
        time.sleep(run_s)
        return [2 * item for item in items]

    recorder = BatchObservers(Recorder(), second := Recorder())
    queue = _queue([slow], max_batch_size=1, max_delay_s=0.0, observer=recorder)
    timing = Timing()
    started = time.monotonic()
    assert await within(queue.submit_many([1, 2], timing=timing)) == [2, 4]
    elapsed = time.monotonic() - started
    await queue.close(1.0)
    first, last = second.batches
    assert run_s <= timing.queued_s < elapsed and run_s <= timing.running_s
    assert timing.running_s == pytest.approx(last.compute_seconds, abs=1e-9)
    assert timing.queued_s + timing.running_s <= elapsed
    assert timing.queued_s >= first.compute_seconds
    assert [len(recorder.observers[0].batches), len(second.batches)] == [2, 2]


# -- priority levels (Triton's dynamic batching priority_levels) ----------------------------


class SteppedWorker:
    """A doubling worker that runs one batch each time the test lets it (`step`)."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []
        self.steps = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)

    def __call__(self, items: list[int]) -> list[int]:
        self.entered.release()
        if not self.steps.acquire(timeout=5):
            raise TimeoutError("the test never let the worker run")
        self.seen.append(list(items))
        return [2 * item for item in items]

    async def wait_entered(self) -> None:
        assert await within(asyncio.to_thread(self.entered.acquire, True, 5)), "no batch came"


async def test_the_highest_level_runs_first_each_level_in_arrival_order() -> None:
    worker, recorder = SteppedWorker(), Recorder()
    queue = _queue(
        [worker], max_batch_size=1, max_delay_s=0.0, observer=recorder, priority_levels=3
    )
    first = asyncio.ensure_future(queue.submit(0, level=3))
    await worker.wait_entered()  # the engine is busy with it; the rest queue behind it
    arrivals = [(3, 1), (3, 2), (1, 3), (2, 4), (1, 5), (3, 6), (2, 7)]  # (level, item)
    waiting = []
    for depth, (level, item) in enumerate(arrivals, 1):
        waiting.append(asyncio.ensure_future(queue.submit(item, level=level)))
        await recorder.depth_becomes(depth)
    for _ in range(len(arrivals) + 1):
        worker.steps.release()
    assert await within(asyncio.gather(first, *waiting)) == [0, *(2 * i for _, i in arrivals)]
    # the definition: by level, then by arrival (Python's sort is stable)
    expected = [item for _, item in sorted(arrivals, key=lambda pair: pair[0])]
    assert [batch[0] for batch in worker.seen] == [0, *expected]
    await within(queue.close(1.0))


async def test_a_batch_takes_the_higher_levels_first() -> None:
    worker, recorder = SteppedWorker(), Recorder()
    queue = _queue(
        [worker], max_batch_size=3, max_delay_s=0.0, observer=recorder, priority_levels=2
    )
    first = asyncio.ensure_future(queue.submit(0))
    await worker.wait_entered()
    low = asyncio.ensure_future(queue.submit_many([1, 2, 3, 4], level=2))
    await recorder.depth_becomes(4)
    high = asyncio.ensure_future(queue.submit_many([5, 6], level=1))
    await recorder.depth_becomes(6)
    for _ in range(3):
        worker.steps.release()
    await within(asyncio.gather(first, low, high))
    assert worker.seen == [[0], [5, 6, 1], [2, 3, 4]]
    await within(queue.close(1.0))


async def test_each_level_holds_its_own_queue_and_its_own_work_ahead() -> None:
    worker, recorder = HeldWorker(), Recorder()
    queue = _queue(
        [worker],
        max_batch_size=1,
        max_delay_s=0.0,
        max_queue_size=2,
        observer=recorder,
        priority_levels=2,
    )
    running = [asyncio.ensure_future(queue.submit(0))]
    await worker.wait_entered()
    running += [asyncio.ensure_future(queue.submit(i, level=2)) for i in (1, 2)]
    await recorder.depth_becomes(2)
    with pytest.raises(QueueFull, match="queue holds 2 of 2 items at priority level 2"):
        await within(queue.submit(3, level=2))
    # the high level's places are its own: bulk traffic filling the low level never
    # refuses it
    running += [asyncio.ensure_future(queue.submit(i, level=1)) for i in (4, 5)]
    await recorder.depth_becomes(4)
    with pytest.raises(QueueFull, match="at priority level 1"):
        await within(queue.submit(6, level=1))
    # a high item waits behind the running one and the high ones; a low one behind all
    assert (queue.work_ahead(1), queue.work_ahead(2)) == (1 + 2, 1 + 4)
    for level in (0, 3):
        with pytest.raises(ValueError, match="not in 1..2"):
            await within(queue.submit(7, level=level))
    worker.released.set()
    assert await within(asyncio.gather(*running)) == [0, 2, 4, 8, 10]
    assert worker.seen == [[0], [4], [5], [1], [2]]
    await within(queue.close(1.0))


async def test_one_level_is_first_come_first_served() -> None:
    worker, recorder = SteppedWorker(), Recorder()
    queue = _queue([worker], max_batch_size=1, max_delay_s=0.0, observer=recorder)
    first = asyncio.ensure_future(queue.submit(0))
    await worker.wait_entered()
    waiting = []
    for depth, item in enumerate(range(1, 9), 1):
        waiting.append(asyncio.ensure_future(queue.submit(item)))
        await recorder.depth_becomes(depth)
    for _ in range(9):
        worker.steps.release()
    await within(asyncio.gather(first, *waiting))
    assert [batch[0] for batch in worker.seen] == list(range(9))
    with pytest.raises(ValueError, match="not in 1..1"):
        await within(queue.submit(1, level=2))
    await within(queue.close(1.0))
