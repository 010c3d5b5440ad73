"""Triton's statistics extension: per model, cumulative counts and durations of what its
requests and batches did since the server started (`GET /v2/models[/M]/stats`, gRPC
ModelStatistics; docs/kserve-v2.md "Statistics").

What each figure counts here, in Triton's terms:
- a request is one call of an inference route or of v2 infer for the model, timed from
  its body having been read to its answer being ready (so the body's upload and the
  response's sending are outside, as are requests refused before they reach the model:
  an unknown model, a body over the limit, a request that does not parse);
- `success` / `fail`: requests that got their answer / that raised (a bad image, a full
  queue, a timeout, an engine failure, a client gone);
- `compute_input`: decoding and preprocessing the request's images (a tensor's rows:
  their checks and copies); `queue`: from its items being queued until the last of them
  began running; `compute_infer`: from then until the last of its batches' engine runs
  ended; `compute_output`: shaping the answer (softmax and top classes, masks, boxes).
  Successful requests only, as Triton counts them, so for every request
  queue + compute_input + compute_infer + compute_output <= its success duration;
- `inference_count`: images in successful requests run by the engine (a segmentation
  image is one, however many tiles it runs as; an image answered from the response cache
  is not counted, as Triton does not count cached requests); `execution_count`: engine
  runs (batches) that succeeded;
- `cache_hit` / `cache_miss` (--response-cache-mib): per image, not per request as in
  Triton (a request may hold several images, some cached): the images of successful
  requests found in the cache / looked up and not found, and their lookups' time (the
  upload's SHA-256 and the lookup);
- `batch_stats`: per batch size (in items: crops, tiles or images), the engine runs and
  their duration, as `compute_infer` (the batch's input assembly and output split are
  part of the run; `compute_input` and `compute_output` stay zero there);
- `last_inference`: when the last successful batch finished, in ms since the epoch.

Every update runs on the event loop (routes, the gRPC handlers and the batcher's
completions), so plain integers suffice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from service.batching import BatchStats

Stage = Literal["compute_input", "compute_output"]
_NS = 1_000_000_000
SERVER_TIMING = "Server-Timing"
# A request's stages in its Server-Timing header: Triton's names, and what each one is.
_SERVER_TIMING = (
    ("compute_input", "decoding and preprocessing"),
    ("queue", "waiting for a batch"),
    ("compute_infer", "the engine"),
    ("compute_output", "making the answer"),
)


@dataclass
class Duration:
    """Triton's StatisticDuration: how many, and their cumulative nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(round(seconds * _NS), 0)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class RequestTimes:
    """One request's seconds in each stage, and its images, filled in as it runs."""

    images: int = 0
    compute_input: float = 0.0
    queue: float = 0.0
    compute_infer: float = 0.0
    compute_output: float = 0.0
    # --response-cache-mib: the seconds each image's lookup took, found or not
    cache_hits: list[float] = field(default_factory=list)
    cache_misses: list[float] = field(default_factory=list)
    # each stage's spans of time as (stage, start, end) in time.monotonic() seconds, in
    # the order they ended: a traced request's spans (service.tracing)
    intervals: list[tuple[str, float, float]] = field(default_factory=list)

    def server_timing(self) -> str:
        """The stages as an HTTP `Server-Timing` header (W3C Server Timing: browsers'
        developer tools show it), in milliseconds: what the model's statistics add up."""
        return ", ".join(
            f'{name};dur={getattr(self, name) * 1000:.3f};desc="{description}"'
            for name, description in _SERVER_TIMING
        )

    @contextlib.contextmanager
    def measure(self, stage: Stage) -> Iterator[None]:
        """Add the wall time of the block to `stage`."""
        started = time.monotonic()
        try:
            yield
        finally:
            ended = time.monotonic()
            setattr(self, stage, getattr(self, stage) + ended - started)
            self.intervals.append((stage, started, ended))

    def batched(self, queued_at: float, queued_s: float, running_s: float) -> None:
        """Add a batcher's wait and engine run (service.batching.Timing) that began at
        `queued_at` (time.monotonic())."""
        self.queue += queued_s
        self.compute_infer += running_s
        if not queued_at:  # nothing was queued (every image from the response cache)
            return
        began = queued_at + queued_s
        self.intervals.append(("queue", queued_at, began))
        self.intervals.append(("compute_infer", began, began + running_s))


class RequestObserver(Protocol):
    def request_done(self, seconds: float, images: int) -> None: ...

    def request_failed(self) -> None: ...


@dataclass
class ModelStatistics:
    """One model's counters (see the module's docstring for what each one counts)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)

    observer: RequestObserver | None = None  # told of each request as well (the metrics)

    @contextlib.contextmanager
    def request(self, times: RequestTimes | None = None) -> Iterator[RequestTimes]:
        """Times the block as one request (in `times`, or new ones): a success when it
        returns, a failure when it raises (cancellation included)."""
        times, started = times or RequestTimes(), time.perf_counter()
        try:
            yield times
        except BaseException:
            self.fail.add(time.perf_counter() - started)
            if self.observer is not None:
                self.observer.request_failed()
            raise
        seconds = time.perf_counter() - started
        if self.observer is not None:
            self.observer.request_done(seconds, times.images)
        self.success.add(seconds)
        self.inference_count += times.images
        self.queue.add(times.queue)
        self.compute_input.add(times.compute_input)
        self.compute_infer.add(times.compute_infer)
        self.compute_output.add(times.compute_output)
        for seconds in times.cache_hits:
            self.cache_hit.add(seconds)
        for seconds in times.cache_misses:
            self.cache_miss.add(seconds)

    # the batcher's observer (service.batching.BatchObserver), beside the metrics'
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, stats: BatchStats) -> None:
        if stats.failed:
            return
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.batches.setdefault(stats.size, Duration()).add(stats.compute_seconds)

    def as_dict(self, name: str, version: str) -> dict:
        """The model's entry of a statistics response, in Triton's JSON shape."""
        none = Duration().as_dict()
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": self.cache_hit.as_dict(),
                "cache_miss": self.cache_miss.as_dict(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": none,
                    "compute_infer": self.batches[size].as_dict(),
                    "compute_output": none,
                }
                for size in sorted(self.batches)
            ],
        }
