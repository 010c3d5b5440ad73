"""Dynamic batching: single requests in, batches through K engine instances, answers out.

Modelled on Ray Serve's `_BatchQueue`, with what a service facing the internet needs:
a bounded queue that refuses at once when full, per-request deadlines, requests whose
client has gone dropped before they reach an engine, an engine failure failing only
its own batch (logged with its traceback and the ids of the requests it held, and their
trace ids, read from `service.logs` when they were submitted), and hooks for queue-time/batch-size/
compute-time metrics. It knows nothing about HTTP, so it can be tested alone.

A batch closes when it holds `max_batch_size` items or `max_delay_s` after its first
item arrived. Batches are only formed when an engine instance is idle, so while all
instances are busy the queue fills and the next batch is fuller (adaptive batching).
When a batch's run ends, its engine is handed the next batch before the answers are
delivered: each answer's continuation (an HTTP response) runs on the event loop, and
had they run first the engine would wait for all of them (a 22 ms engine with batches
of 32 and 64 clients whose answers cost 0.4 ms of loop each sat idle 40% of the time;
`bench/handoff.py`).
With `close_early`, a batch also closes as soon as the queue is empty and no caller has
announced an item on its way (`announce()`, held while a request is decoded): waiting
longer could only delay the batch, never fill it, so a lone request runs at once.

With several instances, a batch also closes once it holds its share of the work ahead
(the items collected, queued and announced, over this instance and the idle others), so
that the idle instances take the rest. Without it, 8 closed-loop clients over two
one-thread instances could settle into one group: an instance's answers came back
together, their 8 next requests were announced together, and one batch waited for all
of them while the other instance idled (10 img/s against 18 for two groups of 4).

A `solo` worker (an engine over all the CPUs beside K one-thread instances) runs a batch
of at most `solo_max_items` that finds every instance idle with nothing else queued or
announced: a lone request gets every core, where one thread would take nearly twice as
long. While it runs no instance does (they would share its cores), so what arrives
meanwhile queues and goes to the instances, which under load beat one wide engine (its
threads meet at every layer beside the decoding threads, the instances never meet).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeVar

from service import thread_names
from service.logs import request_id, trace_id

log = logging.getLogger("hornet.service.batching")

T = TypeVar("T")
R = TypeVar("R")

IsGone = Callable[[], Awaitable[bool]]
# What closed a batch: max_batch_size items; nothing more queued or announced (with
# close_early, checked first); max_delay_s after its first item (with close_early:
# while announced items were still on their way); or its share of the work ahead while
# other instances are idle ("split").
ClosedBy = Literal["full", "delay", "early", "split"]
BatchWorker = Callable[[list[T]], Sequence[R]]


class QueueFull(Exception):
    """The queue holds `max_queue_size` items: the caller should retry later."""


class QueueClosed(Exception):
    """The queue is shutting down and takes no new work."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its answer was ready."""


class ClientGone(Exception):
    """The request's client went away; its item was dropped before the engine."""


class BatchFailed(Exception):
    """The worker raised, or returned a wrong number of results, for this item's batch."""


@dataclass(frozen=True)
class BatchStats:
    size: int
    queue_seconds: list[float]
    compute_seconds: float
    failed: bool
    closed_by: ClosedBy
    solo: bool = False
    cancelled: bool = False  # the service shut down while it ran (failed too, not the engine)
    levels: list[int] = field(default_factory=list)  # each item's priority level, in order


class BatchObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...

    def batch_done(self, stats: BatchStats) -> None: ...


class BatchObservers:
    """Several observers as one, each told every event in turn."""

    def __init__(self, *observers: BatchObserver) -> None:
        self.observers = observers

    def queue_depth(self, depth: int) -> None:
        for observer in self.observers:
            observer.queue_depth(depth)

    def batch_done(self, stats: BatchStats) -> None:
        for observer in self.observers:
            observer.batch_done(stats)


@dataclass
class Timing:
    """Where a `submit_many` call's items spent their time (filled in once it returns):
    `queued_s` from being queued until the last of them began running, `running_s` from
    then until the last of their batches' engine runs ended; `queued_at` when they were
    queued (time.monotonic())."""

    queued_at: float = 0.0
    queued_s: float = 0.0
    running_s: float = 0.0


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued_at: float
    deadline: float | None
    is_gone: IsGone | None = field(default=None)
    level: int = 1  # its priority level: 1 the highest
    request_id: str | None = field(default_factory=request_id.get)
    trace_id: str | None = field(default_factory=trace_id.get)
    started_at: float = 0.0  # when its batch began running (time.monotonic)
    ended_at: float = 0.0  # when its batch's engine run ended


class _Queued(NamedTuple, Generic[T, R]):
    """A waiting item as the priority queue orders it: by level, then arrival (the two
    never tie, so the item itself is never compared)."""

    level: int
    order: int
    entry: _Pending[T, R]


# The longest a finished batch's answers wait for the next batch to be dispatched (it
# normally takes well under a millisecond; a safety net, e.g. while the queue closes).
HANDOFF_WAIT_S = 0.05

# Admission asks for this much slack over the expected wait: compute time per item varies
# with what else runs on the machine (a 10-minute soak beside a test suite on 2 cores still
# saw 11 detection 504s with no margin).
ADMISSION_MARGIN = 1.5


class BatchQueue(Generic[T, R]):
    """Batches items for a set of interchangeable workers (one per engine instance).

    Each worker is a blocking callable taking a list of items and returning one result
    per item, in order; it runs in its own thread so the event loop never blocks.
    """

    def __init__(
        self,
        workers: Sequence[BatchWorker],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        observer: BatchObserver | None = None,
        close_early: bool = False,
        dispatch_first: bool = True,
        solo: BatchWorker | None = None,
        solo_max_items: int = 1,
        name: str = "",
        priority_levels: int = 1,
    ) -> None:
        if not workers:
            raise ValueError("a BatchQueue needs at least one worker")
        if max_batch_size < 1 or max_queue_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size >= 1, max_delay_s >= 0")
        if priority_levels < 1:
            raise ValueError("priority_levels >= 1")
        if solo_max_items < 1:
            raise ValueError("solo_max_items >= 1")
        self._workers = list(workers)
        self.name = name  # the model's, for the debug lines
        self._solo = solo
        self.solo_max_items = solo_max_items
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._observer = observer
        self.close_early = close_early
        # Hand an engine its next batch before delivering its last batch's answers.
        self.dispatch_first = dispatch_first
        # Set while the batch former waits (for an idle engine, a first item, or more
        # items): whatever it could dispatch from the queue has been dispatched; and
        # whether it waits for an engine (an engine handed back wakes it).
        self._former_waits = asyncio.Event()
        self._former_wants_engine = False
        self._announced = 0
        self._news = asyncio.Event()  # an item was queued, or the announced ones ran out
        # Waiting items by (priority level, arrival): the highest level first, each level
        # first come first served; `max_queue_size` places per level.
        self.priority_levels = priority_levels
        self._queue: asyncio.PriorityQueue[_Queued[T, R]] = asyncio.PriorityQueue()
        self._queued_at = [0] * (priority_levels + 1)  # queued items per level
        self._arrivals = itertools.count()
        self._idle: asyncio.Queue[BatchWorker] = asyncio.Queue()
        self._collecting: list[_Pending[T, R]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._closed_because = "the service shut down"  # close(because=...)
        self._running_items = 0
        self._item_seconds: float | None = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not yet handed to a worker)."""
        return self._queue.qsize() + len(self._collecting)

    def start(self) -> None:
        """Start forming batches; call from the running event loop."""
        if self._loop_task is not None:
            return
        threads = len(self._workers) + (self._solo is not None)
        self._executor = ThreadPoolExecutor(
            threads,
            thread_name_prefix="engine",
            initializer=thread_names.set_current,
            initargs=(thread_names.ENGINE,),
        )
        for worker in self._workers:
            self._idle.put_nowait(worker)
        self._loop_task = asyncio.get_running_loop().create_task(self._form_batches())

    async def submit(
        self,
        item: T,
        *,
        deadline: float | None = None,
        is_gone: IsGone | None = None,
        level: int = 1,
    ) -> R:
        """The worker's result for `item`; `deadline` is on the time.monotonic() clock."""
        return (await self.submit_many([item], deadline=deadline, is_gone=is_gone, level=level))[0]

    async def submit_many(
        self,
        items: Sequence[T],
        *,
        deadline: float | None = None,
        is_gone: IsGone | None = None,
        timing: Timing | None = None,
        level: int = 1,
    ) -> list[R]:
        """Results for several independent items, in their order; admitted all or none.

        The items may land in different batches. If one fails, the others are abandoned
        (dropped if still queued) and the first failure is raised. `timing`, when given,
        is filled in with where the items' time went. `level` is their priority level, 1
        (the highest) to `priority_levels`: they run before every item of a lower level
        still waiting, and each level holds `max_queue_size` items.
        """
        if not 1 <= level <= self.priority_levels:
            raise ValueError(f"priority level {level} is not in 1..{self.priority_levels}")
        if self._closed or self._loop_task is None:
            closed = f": {self._closed_because}" if self._closed else ""
            raise QueueClosed(f"the batch queue is not accepting work{closed}")
        waiting = self._waiting_at(level)
        if len(items) > self.max_queue_size - waiting:
            at = f" at priority level {level}" if self.priority_levels > 1 else ""
            raise QueueFull(
                f"queue holds {waiting} of {self.max_queue_size} items{at}; "
                f"{len(items)} more do not fit"
            )
        now = time.monotonic()
        self._refuse_past_deadline(len(items), now, deadline, level)
        loop = asyncio.get_running_loop()
        pending = [
            _Pending(item, loop.create_future(), now, deadline, is_gone, level) for item in items
        ]
        for entry in pending:
            self._put(entry)
        self._news.set()
        self._report_depth()
        timeout = None if deadline is None else max(deadline - now, 0.0)
        answers = asyncio.gather(*(entry.future for entry in pending))
        # A gather cancelled under its waiter (a gRPC client cancelling its call) ends with
        # the CancelledError as its exception, which nothing reads: asyncio would log an
        # error line, "exception was never retrieved", for each such request.
        answers.add_done_callback(retrieve_exception)
        try:
            results = list(await asyncio.wait_for(answers, timeout))
            if timing is not None:
                began = max(entry.started_at for entry in pending)
                timing.queued_at = now
                timing.queued_s = began - now
                timing.running_s = max(entry.ended_at for entry in pending) - began
            return results
        except TimeoutError as exc:
            raise DeadlineExceeded(f"no answer within the deadline ({timeout:.3f} s)") from exc
        finally:
            for entry in pending:
                entry.future.cancel()

    @contextlib.contextmanager
    def announce(self) -> Iterator[None]:
        """While held, a batch being collected waits (up to its delay) for an item on its
        way: hold it from a request's decoding until its items are submitted, so that with
        `close_early` the batch does not close without them."""
        self._announced += 1
        try:
            yield
        finally:
            self._announced -= 1
            if not self._announced:
                self._news.set()

    def work_ahead(self, level: int = 1) -> int:
        """Items a new item of priority `level` waits behind: those running, those being
        collected into a batch, and those queued at its level or a higher one."""
        queued = sum(self._queued_at[1 : level + 1])
        return queued + len(self._collecting) + self._running_items

    def _waiting_at(self, level: int) -> int:
        """Items of priority `level` waiting for a batch (queued or being collected)."""
        collecting = sum(entry.level == level for entry in self._collecting)
        return self._queued_at[level] + collecting

    def expected_wait_s(self, items: int, level: int = 1) -> float | None:
        """Seconds until `items` more of priority `level` would be answered, from the
        measured compute time per item (an exponential average over recent batches) and
        the work ahead of them; None before the first batch has run."""
        if self._item_seconds is None:
            return None
        return (self.work_ahead(level) + items) * self._item_seconds / len(self._workers)

    def _refuse_past_deadline(
        self, items: int, now: float, deadline: float | None, level: int = 1
    ) -> None:
        """Shed at once (QueueFull: 503 with Retry-After) what could only time out (504)
        after holding a place in the queue: a slow model's full queue can take longer
        than a request's deadline, however few items it holds."""
        expected = self.expected_wait_s(items, level)
        if deadline is None or expected is None or now + ADMISSION_MARGIN * expected <= deadline:
            return
        raise QueueFull(
            f"the queue's work ahead would take about {expected:.1f} s, past this request's "
            f"deadline in {max(deadline - now, 0.0):.1f} s"
        )

    async def close(self, drain_timeout_s: float, because: str | None = None) -> None:
        """Refuse new work, let queued and running batches finish within the bound, stop.
        `because` says why to the requests refused (default: the service shut down)."""
        self._closed = True
        if because is not None:
            self._closed_because = because
        give_up_at = time.monotonic() + drain_timeout_s
        while (self.depth or self._running) and time.monotonic() < give_up_at:
            await asyncio.sleep(0.01)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._former_waits.set()
        leftovers = list(self._collecting)
        while not self._queue.empty():
            leftovers.append(self._take())
        self._collecting.clear()
        for entry in leftovers:
            _fail(entry, QueueClosed(f"{self._closed_because} before this request ran"))
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._report_depth()
        # Closed for good: the workers and observers go, so that what they point at (a
        # model's engines, pipeline and buffers, which point back at this queue) is freed
        # at once, not at the interpreter's next full collection (an unloaded model).
        self._loop_task = None  # its cancellation's traceback holds the former's frame
        self._workers = []
        self._solo = None
        while not self._idle.empty():
            self._idle.get_nowait()
        self._observer = BatchObservers()

    async def _former_wait(self, waiting: Awaitable[Any], for_engine: bool = False) -> Any:
        """Await `waiting`, which blocks the batch former, flagged as such."""
        self._former_waits.set()
        self._former_wants_engine = for_engine
        try:
            return await waiting
        finally:
            self._former_waits.clear()
            self._former_wants_engine = False

    async def _form_batches(self) -> None:
        worker: BatchWorker | None = None  # an idle instance the former holds
        while True:
            if worker is None:
                if self._idle.empty():
                    worker = await self._former_wait(self._idle.get(), for_engine=True)
                else:
                    worker = self._idle.get_nowait()
            batch, closed_by = await self._collect()
            live = await self._admissible(batch)
            self._collecting = []
            self._report_depth()
            if not live:
                continue
            if self._solo_takes(live):
                # The former keeps its instance and forms nothing until the solo engine's
                # run returns: no instance runs beside it.
                ran: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._spawn(self._execute(self._solo, live, closed_by, solo_ran=ran))
                await self._former_wait(ran, for_engine=True)
                continue
            self._spawn(self._execute(worker, live, closed_by))
            worker = None

    def _solo_takes(self, batch: list[_Pending[T, R]]) -> bool:
        """Whether the solo engine runs `batch`: small enough, every instance idle (the
        former holds one, the others wait in the idle queue) and nothing else queued or
        on its way."""
        return (
            self._solo is not None
            and len(batch) <= self.solo_max_items
            and self._idle.qsize() == len(self._workers) - 1
            and self._queue.empty()
            and not self._announced
        )

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _collect(self) -> tuple[list[_Pending[T, R]], ClosedBy]:
        """Wait for a first item, then gather more until full or its delay has passed
        (with `close_early`, or until nothing more is queued or announced); the batch and
        what closed it."""
        if self._queue.empty():
            first = await self._former_wait(self._queue.get())
            self._queue.put_nowait(first)  # back in line: one of a higher level may be ahead
        self._collecting = [self._take()]
        close_at = self._collecting[0].enqueued_at + self.max_delay_s
        closed_by: ClosedBy = "full"
        while len(self._collecting) < self.max_batch_size:
            if self._holds_its_share():
                closed_by = "split"
                break
            if not self._queue.empty():
                self._collecting.append(self._take())
                continue
            if self.close_early and not self._announced:
                closed_by = "early"
                break
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                closed_by = "delay"
                break
            self._news.clear()
            try:
                await self._former_wait(asyncio.wait_for(self._news.wait(), remaining))
            except TimeoutError:
                closed_by = "delay"
                break
        return list(self._collecting), closed_by

    def _put(self, entry: _Pending[T, R]) -> None:
        self._queue.put_nowait(_Queued(entry.level, next(self._arrivals), entry))
        self._queued_at[entry.level] += 1

    def _take(self) -> _Pending[T, R]:
        """The waiting item that goes next: the highest level's earliest."""
        entry = self._queue.get_nowait().entry
        self._queued_at[entry.level] -= 1
        return entry

    def _holds_its_share(self) -> bool:
        """Whether the batch being collected holds its share of the work ahead (collected,
        queued and announced items) split over its instance and the idle others; never
        when nothing else is ahead (a lone item closes early or at its delay)."""
        idle_others = self._idle.qsize()
        if not idle_others:
            return False
        ahead = len(self._collecting) + self._queue.qsize() + self._announced
        if ahead == len(self._collecting):  # nothing else to share: the other rules
            return False
        return len(self._collecting) >= -(-ahead // (idle_others + 1))

    async def _admissible(self, batch: list[_Pending[T, R]]) -> list[_Pending[T, R]]:
        """Drop abandoned, expired and disconnected items before they cost engine time."""
        now = time.monotonic()
        live = []
        for entry in batch:
            if entry.future.done():
                continue
            if entry.deadline is not None and now >= entry.deadline:
                _fail(entry, DeadlineExceeded("deadline passed while queued"))
                continue
            if entry.is_gone is not None and await entry.is_gone():
                _fail(entry, ClientGone("client disconnected while queued"))
                continue
            live.append(entry)
        return live

    async def _execute(
        self,
        worker: BatchWorker,
        batch: list[_Pending[T, R]],
        closed_by: ClosedBy,
        solo_ran: asyncio.Future[None] | None = None,
    ) -> None:
        """Run `batch` on `worker` in an engine thread and deliver its answers. An instance
        goes back to the idle queue when its run returns; the solo engine, which is never
        queued, resolves `solo_ran` instead (the former waits on it)."""
        started = time.monotonic()
        self._running_items += len(batch)
        queue_seconds = [started - entry.enqueued_at for entry in batch]
        for entry in batch:
            entry.started_at = started
        failed, cancelled, idle, ran = True, False, False, 0.0
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(
                self._executor, worker, [entry.item for entry in batch]
            )
            ran = time.monotonic() - started
            if self.dispatch_first:
                # Unless the former waits for items (nothing queued to hand over), let it
                # take this engine and dispatch what is queued, then deliver the answers.
                if self._former_wants_engine:
                    self._former_waits.clear()
                self._hand_back(worker, solo_ran)
                idle = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._former_waits.wait(), HANDOFF_WAIT_S)
            if len(results) != len(batch):
                raise BatchFailed(
                    f"the batched function returned {len(results)} results for {len(batch)} inputs"
                )
        except asyncio.CancelledError:
            cancelled = True
            for entry in batch:
                _fail(entry, QueueClosed(f"{self._closed_because} while this request ran"))
            raise
        except Exception as exc:
            log.error(
                "batch failed",
                exc_info=exc,
                extra={
                    "batch_size": len(batch),
                    "request_ids": list(dict.fromkeys(entry.request_id for entry in batch)),
                    "trace_ids": list(
                        dict.fromkeys(entry.trace_id for entry in batch if entry.trace_id)
                    ),
                },
            )
            error = exc if isinstance(exc, BatchFailed) else BatchFailed(describe(exc))
            for entry in batch:
                _fail(entry, error)
        else:
            failed = False
            self._note_compute(ran, len(batch))
            for entry, result in zip(batch, results, strict=True):
                entry.ended_at = started + ran
                if not entry.future.done():
                    entry.future.set_result(result)
        finally:
            self._running_items -= len(batch)
            if not idle:
                self._hand_back(worker, solo_ran)
            stats = BatchStats(
                len(batch),
                queue_seconds,
                ran or time.monotonic() - started,
                failed,
                closed_by,
                solo=solo_ran is not None,
                cancelled=cancelled,
                levels=[entry.level for entry in batch],
            )
            if self._observer is not None:
                self._observer.batch_done(stats)
            if log.isEnabledFor(logging.DEBUG):
                self._log_batch(batch, stats)

    def _log_batch(self, batch: list[_Pending[T, R]], stats: BatchStats) -> None:
        """A debug line per batch run (the verbose log): what closed it, how long its
        items waited, its engine time and the requests it held."""
        outcome = "cancelled" if stats.cancelled else "failed" if stats.failed else "ok"
        log.debug(
            "batch ran",
            extra={
                "model": self.name,
                "batch_size": stats.size,
                "closed_by": stats.closed_by,
                "solo": stats.solo,
                "outcome": outcome,
                "engine_ms": round(stats.compute_seconds * 1000, 3),
                "queue_ms": [round(seconds * 1000, 3) for seconds in stats.queue_seconds],
                "request_ids": list(dict.fromkeys(entry.request_id for entry in batch)),
                "trace_ids": list(dict.fromkeys(e.trace_id for e in batch if e.trace_id)),
            },
        )

    def _hand_back(self, worker: BatchWorker, solo_ran: asyncio.Future[None] | None) -> None:
        if solo_ran is None:
            self._idle.put_nowait(worker)
        elif not solo_ran.done():
            solo_ran.set_result(None)

    def _note_compute(self, seconds: float, items: int) -> None:
        per_item = seconds / items
        previous = self._item_seconds
        self._item_seconds = per_item if previous is None else 0.7 * previous + 0.3 * per_item

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(self.depth)


def retrieve_exception(future: asyncio.Future) -> None:
    """A done callback that reads `future`'s exception, so that asyncio does not log one
    nothing else reads ("exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


def _fail(entry: _Pending, error: Exception) -> None:
    if not entry.future.done():
        entry.future.set_exception(error)


def describe(exc: Exception) -> str:
    """An exception as its type and message, the way errors are reported."""
    return f"{type(exc).__name__}: {exc}"
