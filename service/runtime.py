"""The served models: each bundle with its pipeline, K engine instances and its batcher.

`ModelPool` loads and warms every bundle (off the event loop, so /healthz answers
while it works), answers which model a request means, and drains on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from hornet_bundle import MANIFEST_NAME, Bundle, BundleError, load_bundle
from service import batching, thread_names
from service.cache import ResponseCache, digest
from service.engines import (
    InferenceEngine,
    create_engine,
    instances_of,
    static_sizes,
    unverified_precision,
    verified_elsewhere,
)
from service.errors import (
    EngineFailure,
    InvalidParameters,
    InvalidPriority,
    LoadFailed,
    ModelControlOff,
    NotReady,
    Overloaded,
    ServiceError,
    Timeout,
    UnknownModel,
)
from service.imaging import decode_image, draft_size
from service.memory import LARGE_IMAGE_PIXELS, MemoryReleaser
from service.metrics import ServiceMetrics
from service.pipelines import Answer, AnswerOptions, Pipeline, Prepared, pipeline_for
from service.schemas import UINT64_MAX, BatchSettings, ModelInfo
from service.settings import Settings, bundle_name
from service.statistics import ModelStatistics, RequestTimes
from service.tracing import Tracing

log = logging.getLogger("hornet.service")

T = TypeVar("T")
R = TypeVar("R")

EngineFactory = Callable[[Bundle, Settings], InferenceEngine]


def warmup_sizes(settings: Settings, batched: bool) -> list[int]:
    """The batch sizes an engine instance runs once at load: 1 alone, every size the
    batcher can form, or (`--warmup-batch-sizes auto` on CUDA) the sizes of the static
    batch sessions (service.engines.static_sizes: max batch size and the powers of two
    below it), whose CUDA provider plans its convolutions on a session's first run. A
    pipeline that gives the engine one image at a time (`batched` false) needs only 1."""
    mode = settings.warmup_batch_sizes
    if mode == "one" or not batched or (mode == "auto" and settings.device != "cuda"):
        return [1]
    if mode == "auto":
        return list(static_sizes(settings.max_batch_size))
    return list(range(1, settings.max_batch_size + 1))


_RETRY = {"Retry-After": "5"}


def _shutting_down() -> NotReady:
    return NotReady("the server is shutting down", headers=_RETRY)


def bundle_signature(path: str | Path) -> str:
    """What tells one version of the bundle at `path` from another: the SHA-256 of its
    manifest and of each file's path, size and modification time under it, hidden ones
    aside (an export in progress writes the next version under `.export-XXXX`, and a
    manifest is written as a hidden file first). A bundle copied in pieces (its manifest
    first) changes it again as each file lands."""
    root = Path(path)
    digest_ = hashlib.sha256()
    try:
        digest_.update((root / MANIFEST_NAME).read_bytes())
    except OSError as exc:
        digest_.update(repr(exc.errno).encode())
    for folder, folders, files in os.walk(root):  # top-down: pruned of hidden folders
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for file in sorted(name for name in files if not name.startswith(".")):
            try:
                stat = (Path(folder) / file).stat()
            except OSError:
                continue
            where = os.path.relpath(Path(folder) / file, root)
            digest_.update(f"{where}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest_.hexdigest()


def precision_refusal(bundle: Bundle, served: Settings) -> str | None:
    """Why `bundle` may not run at the precision its settings ask for (not verified at
    it), or None; with --allow-unverified-precision None and a warning instead. A
    warning too when it was verified on another CPU than this one."""
    settings = served.for_model(bundle.name)
    reason = unverified_precision(bundle, settings)
    if reason is None:
        elsewhere = verified_elsewhere(bundle, settings)
        if elsewhere is not None:
            log.warning(
                "precision verified on another CPU",
                extra={"model": bundle.name, "precision": settings.precision, "reason": elsewhere},
            )
        return None
    if not settings.allow_unverified_precision:
        return reason
    log.warning(
        "serving an unverified precision (--allow-unverified-precision)",
        extra={"model": bundle.name, "precision": settings.precision, "reason": reason},
    )
    return None


class LoadingStopped(Exception):
    """Model loading given up because the server is shutting down."""


class FailureStreak:
    """A batch observer counting a model's batches that failed in a row (a successful one
    starts the count again), calling `at_limit(count)` when it reaches `limit` (0: never)."""

    def __init__(self, limit: int, at_limit: Callable[[int], None]) -> None:
        self.limit, self.at_limit, self.count = limit, at_limit, 0

    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, stats: batching.BatchStats) -> None:
        if stats.cancelled:  # the service shutting down, not the engine
            return
        if not stats.failed:
            self.count = 0
            return
        self.count += 1
        if self.count == self.limit:
            self.at_limit(self.count)


class ClientDisconnected(ServiceError):
    status_code = 499
    code = "client_disconnected"


async def in_turns(
    start: Callable[[T], Awaitable[R]],
    items: Sequence[T],
    *,
    window: int,
    deadline: float | None,
    is_gone: batching.IsGone | None,
    doing: str,
) -> list[R]:
    """`start(item)`'s result for each of a request's items, in order, with at most
    `window` of them started and not finished at once: the next is started as one
    finishes, so that another request's work handed to the same threads meanwhile waits
    behind `window` of this one's, not all of them. Once one fails (its exception is
    raised), `deadline` (time.monotonic()) passes (Timeout, 504) or the client is gone
    (`is_gone`, ClientDisconnected, 499), the items not yet started never are, and those
    waiting for a thread are cancelled. `doing` says what was being done, for the
    messages."""
    window = max(1, window)
    done: list[Any] = [None] * len(items)
    running: dict[asyncio.Future[R], int] = {}
    started = 0
    try:
        while True:
            while started < len(items) and len(running) < window:
                running[asyncio.ensure_future(start(items[started]))] = started
                started += 1
            if not running:
                return done
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"the request's deadline passed while {doing}")
            finished, _ = await asyncio.wait(
                running, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            for job in finished:
                done[running.pop(job)] = job.result()  # a failure raises here
            # before starting more (asked once per item, and not after the last)
            if started < len(items) and is_gone is not None and await is_gone():
                raise ClientDisconnected(f"client disconnected while {doing}")
    finally:
        for job in running:  # waiting for a thread: never run; running: left to finish
            job.cancel()


class ModelRunner:
    """One bundle being served: pipeline + engines + batcher."""

    def __init__(
        self,
        bundle: Bundle,
        engines: Sequence[InferenceEngine],
        settings: Settings,
        metrics: ServiceMetrics,
        decoder: Executor,
        releaser: MemoryReleaser,
        weight_copies: int = 0,
        solo: InferenceEngine | None = None,
        on_failing: Callable[[str, int], None] | None = None,
    ) -> None:
        self.bundle = bundle
        # told (model name, count) when --max-engine-failures batches in a row have failed
        self.on_failing = on_failing
        self.decoder = decoder
        # a request's images decoded, or answers made, at once (in_turns): one per
        # decoding thread (read once: it looks at the cgroup's files)
        self.turns = settings.decode_workers
        self.releaser = releaser
        self.manifest = bundle.manifest
        self.name = bundle.manifest.name
        self.pipeline: Pipeline = pipeline_for(bundle.manifest)
        self.engines = list(engines)
        self.solo = solo  # --solo-engine
        # 0: one per engine (none shares another's), the solo engine's included
        self.weight_copies = weight_copies or len(self.engines) + (solo is not None)
        self.settings = settings
        self.draft = (
            draft_size(self.pipeline.first_resize, settings.jpeg_reducing_gap)
            if settings.jpeg_reducing_gap
            else None
        )
        self.observer = metrics.for_model(self.name)
        # requests holding this runner (`in_use`): an unload or reload waits for them
        self.users = 0
        # its bundle's files when it was loaded (bundle_signature; "" unless polling)
        self.signature = ""
        # --response-cache-mib: engine results of encoded images, by their digest
        mib = settings.response_cache_mib
        self.cache = ResponseCache(mib << 20) if mib else None
        # Triton's statistics extension; each request counted in the metrics too
        self.statistics = ModelStatistics(observer=self.observer)
        workers = [self._worker_for(engine) for engine in self.engines]
        self.queue: batching.BatchQueue[Any, Any] = batching.BatchQueue(
            workers,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            observer=batching.BatchObservers(
                self.observer,
                self.statistics,
                FailureStreak(settings.max_engine_failures, self._failing),
            ),
            close_early=settings.close_batches_early,
            solo=self._worker_for(solo) if solo is not None else None,
            name=self.name,
            priority_levels=settings.priority_levels,
        )

    def priority_level(self, asked: object) -> int:
        """The priority level a request that asked for `asked` waits at (Triton's
        `priority`): 1 (the highest) to --priority-levels, or 0 for the model's default
        level; InvalidPriority for anything else (asked before its images are decoded).
        A model of one level takes any priority, as Triton's without priority levels
        does: every request waits at the one level."""
        levels = self.settings.priority_levels
        if isinstance(asked, bool) or not isinstance(asked, int) or not 0 <= asked <= UINT64_MAX:
            valid = False
        else:
            valid = asked <= levels or levels == 1
        if not valid:
            raise InvalidPriority(
                f"priority {asked!r} is not a priority level of model {self.name!r}: 1 (the "
                f"highest) to {levels}, or 0 for its default level, {self.settings.default_level} "
                "(--priority-levels, --default-priority-level)"
            )
        return min(asked, levels) or self.settings.default_level

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Held by a request from finding this model until its answer is made, so that
        unloading or reloading the model (ModelPool.unload_model, load_model) answers it
        before closing the engines. Enter it with no await after finding the model."""
        self.users += 1
        try:
            yield
        finally:
            self.users -= 1

    def _failing(self, count: int) -> None:
        if self.on_failing is not None:
            self.on_failing(self.name, count)

    def _worker_for(self, engine: InferenceEngine) -> batching.BatchWorker:
        def run(items: list[Any]) -> list[Any]:
            return self.pipeline.run_batch(engine, items)

        return run

    def warm_up(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """A run per engine instance and warm-up batch size (`warmup_sizes`), so that no
        request pays an engine's lazy initialisation for a shape it first sees. Stops with
        LoadingStopped between runs once `stopping()` is true: a server told to exit
        while it warms up (a CUDA fp16 warm-up took minutes) exits after the run in
        progress, not after the whole warm-up."""
        items, sizes = self.pipeline.warmup_items(), self.warmup_sizes()
        for engine in self.all_engines:
            for size in sizes:
                if stopping():
                    raise LoadingStopped("the server is shutting down")
                self.pipeline.run_batch(engine, [items[i % len(items)] for i in range(size)])

    def warmup_sizes(self) -> list[int]:
        return warmup_sizes(self.settings, self.pipeline.batched)

    @property
    def all_engines(self) -> list[InferenceEngine]:
        """The instances, and the solo engine where there is one."""
        return self.engines + ([self.solo] if self.solo is not None else [])

    async def prepare(
        self,
        uploads: Sequence[bytes],
        times: RequestTimes | None = None,
        *,
        deadline: float | None = None,
        is_gone: batching.IsGone | None = None,
    ) -> list[Prepared]:
        """Decode and preprocess every upload in the decoding threads, off the event loop
        (their number bounds how many decoded images exist at once); with the response
        cache, an upload it holds comes back with its results and nothing to run, and
        `times` gets each lookup.

        A request has at most one upload per decoding thread waiting or being decoded at a
        time (`_decoded_all`): its next is handed over as one finishes, so requests take
        turns in the decoding queue, and once one of its uploads fails, its `deadline`
        passes or its client goes (`is_gone`), the uploads not yet begun are never decoded.

        Announced to the batch queue meanwhile, so a batch being collected waits for these
        items (see BatchQueue.announce). The caller submits them (`infer`) with no await
        in between, so no batch can close between the announcement's end and the items'
        arrival."""
        with self.queue.announce():
            done = await self._decoded_all(uploads, deadline, is_gone)
        if self.cache is not None:
            hits = sum(image.cached is not None for image, _ in done)
            self.observer.cache_looked_up(hits, len(done) - hits)
            if times is not None:
                for image, lookup_s in done:
                    found = image.cached is not None
                    (times.cache_hits if found else times.cache_misses).append(lookup_s)
        return [image for image, _ in done]

    async def _decoded_all(
        self,
        uploads: Sequence[bytes],
        deadline: float | None,
        is_gone: batching.IsGone | None,
    ) -> list[tuple[Prepared, float]]:
        """`_prepare_one` of each upload, in order, with at most --decode-threads of them
        handed to the decoding threads at once (`in_turns`). Before, every upload of a
        request was queued at once and decoded whatever became of the request: a request
        of one undecodable image and 30 flat 36-megapixel PNGs was answered 400 in 0.12 s
        and left 4 s of decoding behind it, ahead of every later request's images."""
        loop = asyncio.get_running_loop()
        return await in_turns(
            lambda data: loop.run_in_executor(self.decoder, self._prepare_one, data),
            uploads,
            window=self.turns,
            deadline=deadline,
            is_gone=is_gone,
            doing=f"its {len(uploads)} images were decoded (model {self.name!r})",
        )

    async def answers(
        self,
        prepared: Sequence[Prepared],
        results: Sequence[list[Any]],
        options: AnswerOptions,
        *,
        deadline: float,
        is_gone: batching.IsGone | None,
    ) -> list[Answer]:
        """Each image's answer, `pipeline.finish` off the event loop, in turns as the
        decoding (`in_turns`): a segmenter's or detector's mask at the upload's size each,
        none begun once the deadline passes or the client goes. Before, all of a
        request's were handed to threads at once and made whatever the deadline."""
        finish = self.pipeline.finish
        return await in_turns(
            lambda pair: asyncio.to_thread(finish, *pair, options),
            list(zip(prepared, results, strict=True)),
            window=self.turns,
            deadline=deadline,
            is_gone=is_gone,
            doing=f"its {len(prepared)} answers were made (model {self.name!r})",
        )

    def _prepare_one(self, data: bytes) -> tuple[Prepared, float]:
        """The upload made ready (or found in the response cache), and the seconds its
        cache lookup took (0 without a cache)."""
        key, lookup_s = None, 0.0
        if self.cache is not None:
            started = time.perf_counter()
            key = digest(data)
            hit = self.cache.get(key)
            lookup_s = time.perf_counter() - started
            if hit is not None:
                found = Prepared([], hit.width, hit.height, hit.context, key, hit.results)
                return found, lookup_s
        prepared = self._decoded(data)
        prepared.digest = key
        return prepared, lookup_s

    def _decoded(self, data: bytes) -> Prepared:
        settings = self.settings
        start = time.perf_counter()
        decoded = decode_image(
            data,
            settings.max_pixels,
            settings.max_aspect_ratio,
            self.draft,
            settings.max_jpeg_scans,
        )
        if decoded.image.width * decoded.image.height > LARGE_IMAGE_PIXELS:
            self.releaser.note_large_work()
        prepared = self.pipeline.prepare(decoded)
        self.observer.image_prepared(time.perf_counter() - start, decoded.reduction)
        return prepared

    async def infer(
        self,
        prepared: Sequence[Prepared],
        *,
        deadline: float,
        is_gone: batching.IsGone | None = None,
        times: RequestTimes | None = None,
        level: int | None = None,
    ) -> list[list[Any]]:
        """The engine results of every item of every image, grouped per image in order;
        `times` (a request's statistics) gets the images and their time in the batcher.
        `level` is the request's priority level (`priority_level`; None: the default)."""
        items = [item for image in prepared for item in image.items]
        timing = batching.Timing()
        level = self.priority_level(0) if level is None else level
        try:
            results = (
                await self.queue.submit_many(
                    items, deadline=deadline, is_gone=is_gone, timing=timing, level=level
                )
                if items  # none when every image came from the response cache
                else []
            )
        except batching.QueueFull as exc:
            raise Overloaded(str(exc), headers={"Retry-After": "1"}) from exc
        except batching.QueueClosed as exc:
            raise NotReady(str(exc), headers=_RETRY) from exc
        except batching.DeadlineExceeded as exc:
            raise Timeout(f"model {self.name!r}: {exc}") from exc
        except batching.ClientGone as exc:
            raise ClientDisconnected(str(exc)) from exc
        except batching.BatchFailed as exc:
            raise EngineFailure(f"model {self.name!r} engine failed: {exc}") from exc
        if times is not None:
            times.images += sum(image.cached is None for image in prepared)
            times.batched(timing.queued_at, timing.queued_s, timing.running_s)
        grouped, start = [], 0
        for image in prepared:
            if image.cached is not None:
                grouped.append(image.cached)
                continue
            mine = results[start : start + len(image.items)]
            start += len(image.items)
            grouped.append(mine)
            if self.cache is not None and image.digest is not None:
                self.cache.put(image.digest, image.width, image.height, image.context, mine)
        if self.cache is not None:
            self.observer.cache_holds(self.cache.size)
        return grouped

    def info(self, ready: bool) -> ModelInfo:
        manifest = self.manifest
        return ModelInfo(
            name=self.name,
            task=manifest.task,
            variant=manifest.variant,
            input_size=manifest.preprocess.input_size,
            labels=len(manifest.labels),
            engine=self.engines[0].description,
            weight_copies=self.weight_copies,
            batching=BatchSettings(
                max_batch_size=self.settings.max_batch_size,
                max_delay_ms=self.settings.max_delay_ms,
                close_early=self.settings.close_batches_early,
                max_queue_size=self.settings.max_queue_size,
                instances=len(self.engines),
                solo_engine=self.solo is not None,
            ),
            demo=manifest.demo,
            ready=ready,
        )

    def close_engines(self) -> None:
        for engine in self.all_engines:
            engine.close()


def _decoding_thread(nice: int) -> None:
    """Name a decoding thread for the OS (`service.thread_names`) and add `nice` to its
    nice value (Linux gives each thread its own), up to 19; raising it needs no privilege.
    Elsewhere a thread id is no process id, so the setting is ignored there (`ModelPool`
    says so once)."""
    thread_names.set_current(thread_names.DECODE)
    if nice and sys.platform == "linux":
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(current + nice, 19))


class ModelPool:
    """Every served model; `ready` once all are loaded, warmed and batching."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        engine_factory: EngineFactory = create_engine,
        *,
        bundles: Sequence[Bundle] | None = None,
    ) -> None:
        self.settings = settings
        self._sources: list[Bundle | Any] = (
            list(bundles) if bundles is not None else settings.start_bundle_dirs
        )
        self.metrics = metrics
        self._engine_factory = engine_factory
        # OpenTelemetry traces of the inference requests (--trace-endpoint), and their
        # settings (Triton's trace extension)
        self.tracing = Tracing(
            settings.trace_endpoint,
            rate=settings.trace_rate,
            count=settings.trace_count,
            changeable=settings.allow_trace_settings,
        )
        self.runners: dict[str, ModelRunner] = {}
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        # set when a model's batches have failed --max-engine-failures times in a row: the
        # server stops taking work and exits (service.cli) for its supervisor to restart it
        self.engine_failure: str | None = None
        self._drain_deadline: float | None = None
        self._closing: asyncio.Future[None] | None = None
        # model control (--model-control-mode explicit or poll): one load or unload at a
        # time; the models being loaded; why each model not loaded is not ("unloaded", or
        # its load's error); the runners retiring (their last requests being answered)
        self._control = asyncio.Lock()
        self._loading: set[str] = set()
        self._unavailable: dict[str, str] = {}
        self._stale: dict[str, str] = {}  # served models whose new version did not load: why
        self._retiring: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None  # --model-control-mode poll
        if settings.decode_nice and sys.platform != "linux":
            log.warning("--decode-nice is ignored: threads have their own nice value on Linux only")
        self.decoder = ThreadPoolExecutor(
            settings.decode_workers,
            thread_name_prefix="decode",
            initializer=_decoding_thread,
            initargs=(settings.decode_nice,),
        )
        self.releaser = MemoryReleaser()

    async def load(self) -> None:
        """Load, verify, build and warm every bundle; then start batching and turn ready."""
        try:
            if not self._sources and not self.settings.models_change:
                raise ValueError("no model bundles given: pass --model-dir")
            for source in self._sources:
                runner = await asyncio.to_thread(self._build_runner, source)
                if runner.name in self.runners:
                    raise ValueError(
                        f"two bundles are named {runner.name!r} "
                        f"({self.runners[runner.name].bundle.path} and {runner.bundle.path})"
                    )
                self.runners[runner.name] = runner
            self.settings.check_served(self.runners)
            for runner in self.runners.values():
                runner.queue.start()
        except LoadingStopped:
            log.info("model loading stopped: shutting down")
            return
        except Exception as exc:
            self.load_error = batching.describe(exc)
            log.error("model loading failed", extra={"error": self.load_error})
            raise
        self.ready = not self.draining
        log.info("models ready", extra={"models": sorted(self.runners)})
        if self.settings.model_control_mode == "poll" and self.ready:
            self._poller = asyncio.ensure_future(self._poll())

    def _build_runner(self, source: Bundle | Any) -> ModelRunner:
        # The engines' own threads (ONNX Runtime's and OpenVINO's pools), started while
        # they are built and warmed, take the loading thread's name (service.thread_names).
        with thread_names.named(thread_names.ENGINE):
            return self._build_runner_named(source)

    def _build_runner_named(self, source: Bundle | Any) -> ModelRunner:
        started = time.monotonic()
        # polling: its files as they were before they were read (a change while loading:
        # a reload); not looked at otherwise
        signature = (
            bundle_signature(source.path if isinstance(source, Bundle) else source)
            if self.settings.model_control_mode == "poll"
            else ""
        )
        bundle = source if isinstance(source, Bundle) else load_bundle(source)
        settings = self.settings.for_model(bundle.manifest.name)  # --model-setting
        engines: list[InferenceEngine] = []
        copies = 0  # engines with weights of their own
        try:
            if self.draining:
                raise LoadingStopped("the server is shutting down")
            for engine, own in instances_of(bundle, settings, self._engine_factory):
                engines.append(engine)
                copies += own
                if self.draining:  # before making the next one
                    raise LoadingStopped("the server is shutting down")
            if settings.solo_engine:
                solo = self._engine_factory(bundle, settings.for_solo_engine())
                engines.append(solo)  # closed with the others if loading stops
                copies += 1
            runner = ModelRunner(
                bundle,
                engines[: settings.instances],
                settings,
                self.metrics,
                self.decoder,
                self.releaser,
                weight_copies=copies,
                solo=engines[-1] if settings.solo_engine else None,
                on_failing=self._engine_failing,
            )
            runner.signature = signature
            runner.warm_up(stopping=lambda: self.draining)
        except LoadingStopped:
            for engine in engines:
                engine.close()
            raise
        log.info(
            "model loaded",
            extra={
                "model": runner.name,
                "task": bundle.manifest.task,
                "engine": engines[0].description,
                "instances": len(runner.engines),
                "solo_engine": runner.solo is not None,
                "weight_copies": copies,
                "warmup_batch_sizes": runner.warmup_sizes(),
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return runner

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every bundle given, in order (under explicit or poll
        model control, then every other bundle the server may load), each with its state."""
        started = [
            source.manifest.name if isinstance(source, Bundle) else bundle_name(Path(source))
            for source in self._sources
        ]
        loadable = (
            [name for name, _ in self.settings.loadable()] if self.settings.models_change else []
        )
        names = dict.fromkeys([*started, *loadable, *self.runners])
        return [self._entry(name, name in started) for name in names]

    def _entry(self, name: str, at_start: bool) -> dict[str, str]:
        """A model's index entry: READY once loaded and the server ready; LOADING while it
        loads (at start, or asked to); else UNAVAILABLE with the reason: a failure that
        stops the server, the drain, or (model control) its unload or the error its last
        load met, or that it was never loaded; a READY model whose new version did not
        load says so too."""
        state, reason = "UNAVAILABLE", ""
        if self.failure or self.draining:
            reason = self.failure or "the server is shutting down"
        elif name in self.runners:
            state = "READY" if self.ready else "LOADING"
            if name in self._stale:
                reason = "serving the version loaded before: a new one did not load: "
                reason += self._stale[name]
        elif name in self._loading or (at_start and not self.ready):
            state = "LOADING"
        else:
            reason = self._unavailable.get(name, "not loaded")
        entry = {"name": name, "version": "1", "state": state}
        if reason:
            entry["reason"] = reason
        return entry

    async def load_model(self, name: str) -> None:
        """Explicit model control: load the bundle of model `name` (--model-dir's or the
        repository's, read again from its directory), verified and warmed as at start,
        while the version in service, if any, goes on answering; then serve it, and
        retire the old version once the requests holding it are answered. A load waits
        for the versions still retiring: a model never has more than two at once."""
        self._asked_allowed()
        await self._load(name)

    async def unload_model(self, name: str) -> None:
        """Explicit model control: stop serving model `name` (new requests for it get
        404), answer the requests it holds (up to --drain-timeout-s; any left then get
        503), and close its engines. Unloading a model not loaded does nothing."""
        self._asked_allowed()
        await self._unload(name)

    async def _load(self, name: str) -> None:
        async with self._control:
            self._control_allowed()
            try:
                path = self._bundle_of(name)
            except LoadFailed as exc:  # several bundles of the model
                log.error("model load failed", extra={"model": name, "error": exc.detail})
                self.metrics.model_control.labels(name, "load", "failure").inc()
                raise
            # versions retiring first: at most two of a model's versions at once (the one
            # serving and the one loading), however fast reloads are asked for
            await asyncio.gather(*self._retiring, return_exceptions=True)
            self._loading.add(name)
            try:
                runner = await asyncio.to_thread(self._loaded_checked, path, name)
            except LoadingStopped as exc:
                raise _shutting_down() from exc
            except Exception as exc:  # noqa: BLE001 - said to the client, the old version kept
                reason = str(exc) if isinstance(exc, BundleError) else batching.describe(exc)
                if name in self.runners:
                    self._stale[name] = reason
                else:
                    self._unavailable[name] = reason
                log.error("model load failed", extra={"model": name, "error": reason})
                self.metrics.model_control.labels(name, "load", "failure").inc()
                raise LoadFailed(f"model {name!r} did not load: {reason}") from exc
            finally:
                self._loading.discard(name)
            if self.draining:
                await asyncio.to_thread(runner.close_engines)
                raise _shutting_down()
            runner.queue.start()
            old = self.runners.get(name)
            self.runners[name] = runner
            self._unavailable.pop(name, None)
            self._stale.pop(name, None)
            log.info("model serving", extra={"model": name, "replaced": old is not None})
            self.metrics.model_control.labels(name, "load", "success").inc()
            if old is not None:
                self._retire(old, f"model {name!r} was reloaded")

    async def _unload(self, name: str) -> None:
        async with self._control:
            self._control_allowed()
            runner = self.runners.pop(name, None)
            if runner is None:
                self._bundle_of(name)  # 404 for a model the server does not know
                return
            self._unavailable[name] = "unloaded"
            self._stale.pop(name, None)
            self.metrics.model_control.labels(name, "unload", "success").inc()
            await asyncio.shield(self._retire(runner, f"model {name!r} was unloaded"))

    def _asked_allowed(self) -> None:
        """A client may load and unload: explicit model control only."""
        if self.settings.model_control_mode == "poll":
            raise ModelControlOff(
                "this server loads, reloads and unloads models as their bundles appear, "
                "change and go (--model-control-mode poll); load and unload by request "
                "need --model-control-mode explicit"
            )
        if not self.settings.explicit_control:
            raise ModelControlOff(
                "models load at start and stay loaded on this server; load and unload "
                "need --model-control-mode explicit"
            )

    def _control_allowed(self) -> None:
        if self.draining:
            raise _shutting_down()
        # after the models it starts with: a load racing the start's could serve a model
        # twice over
        self.require_ready()

    async def _poll(self) -> None:
        """--model-control-mode poll: every --repository-poll-secs, the bundles looked at
        again (`_poll_once`) until the drain."""
        failed: dict[str, str] = {}
        missing: set[str] = set()
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            if self.draining:
                return
            try:
                missing = await self._poll_once(failed, missing)
            except NotReady:
                return  # the drain began
            except Exception as exc:  # noqa: BLE001 - a repository not readable this time
                log.warning("model repository not read", extra={"error": batching.describe(exc)})

    async def _poll_once(self, failed: dict[str, str], missing: set[str]) -> set[str]:
        """Load each bundle whose model is not served, reload each whose files changed
        (`bundle_signature`), and unload each model whose bundle has gone, at the second
        look in a row (a bundle being rewritten in place is not unloaded in between). A
        bundle that did not load is tried again once its files change. Returns the
        models found gone this time."""
        found = await asyncio.to_thread(self._bundles_found)
        log.debug(
            "model repository polled",
            extra={
                "bundles": sorted(found),
                "gone": sorted(name for name in self.runners if name not in found),
                "not_loading": sorted(n for n, sig in failed.items() if found.get(n) == sig),
            },
        )
        for name, signature in found.items():
            runner = self.runners.get(name)
            if signature in (failed.get(name), runner.signature if runner else None):
                continue
            try:
                await self._load(name)
            except LoadFailed:
                failed[name] = signature  # logged and counted; not again until it changes
            else:
                failed.pop(name, None)
        gone = {name for name in self.runners if name not in found}
        for name in gone & missing:
            await self._unload(name)
        return gone - missing

    def _bundles_found(self) -> dict[str, str]:
        """Each model the bundles are of, with its bundle's signature (the signatures of
        all its bundles where several are of one model: that one does not load)."""
        found: dict[str, list[str]] = {}
        for name, path in self.settings.loadable():
            found.setdefault(name, []).append(bundle_signature(path))
        return {name: " ".join(signatures) for name, signatures in found.items()}

    def _bundle_of(self, name: str) -> Path:
        """The directory of model `name`'s bundle; UnknownModel where none is named so."""
        found = [path for model, path in self.settings.loadable() if model == name]
        if not found:
            loaded = self.runners.get(name)
            if loaded is not None:  # its directory no longer in the repository
                return loaded.bundle.path
            raise UnknownModel(
                f"no bundle of a model named {name!r} among the server's bundles and model "
                "repositories"
            )
        if len(found) > 1:
            raise LoadFailed(
                f"several bundles are of a model named {name!r}: {', '.join(map(str, found))}"
            )
        return found[0]

    def _loaded_checked(self, path: Path, name: str) -> ModelRunner:
        """The runner of the bundle at `path`, which must still be of model `name` and
        verified at the precision it would run at (as at start: precision_refusal)."""
        bundle = load_bundle(path)
        if bundle.name != name:
            raise BundleError(f"{path} now holds model {bundle.name!r}, not {name!r}")
        refusal = precision_refusal(bundle, self.settings)
        if refusal is not None:
            raise ValueError(refusal)
        return self._build_runner(bundle)

    def _retire(self, runner: ModelRunner, because: str) -> asyncio.Task[None]:
        """In the background: wait (up to --drain-timeout-s) for the requests holding
        `runner`, close its queue (what is left then gets 503 saying `because`) and its
        engines."""
        task = asyncio.ensure_future(self._retired(runner, because))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _retired(self, runner: ModelRunner, because: str) -> None:
        give_up_at = time.monotonic() + self.settings.drain_timeout_s
        while runner.users and time.monotonic() < give_up_at:
            await asyncio.sleep(0.01)
        await runner.queue.close(max(give_up_at - time.monotonic(), 0.0), because=because)
        await asyncio.to_thread(runner.close_engines)
        runner.observer.cache_holds(0)
        self.releaser.note_large_work()  # hand the freed engines' memory back
        log.info("model retired", extra={"model": runner.name, "because": because})

    @property
    def failure(self) -> str | None:
        """Why the models cannot serve, if they failed: engines that kept failing
        (--max-engine-failures), else a model that did not load; None otherwise."""
        return self.engine_failure or self.load_error

    def _engine_failing(self, model: str, count: int) -> None:
        """A model's engines failed `count` batches in a row (--max-engine-failures): not
        ready from now on; the server notices and exits (service.cli)."""
        if self.engine_failure is None:
            self.engine_failure = (
                f"model {model!r}: {count} batches in a row failed in its engines "
                "(--max-engine-failures); the server exits to be restarted"
            )
            log.error("engines failing", extra={"model": model, "batches": count})
        self.ready = False

    def require_ready(self) -> None:
        """Work waits (503) until every model is loaded and warm, and stops at the drain."""
        if not self.ready:
            detail = self.failure or (
                "shutting down" if self.draining else "models are still loading"
            )
            raise NotReady(detail, headers=_RETRY)

    def get(self, name: str | None, task: str | None = None, *, ready: bool = True) -> ModelRunner:
        """The model a request means: the one named (which must serve `task`, when given),
        or the only model of `task`. With `ready` the pool must be ready, as work needs;
        without, a model already loaded is found while others load or the server drains
        (for what only describes it), and a name not loaded yet waits for the loading."""
        if ready:
            self.require_ready()
        if name is None:
            return self._only_model_of(task)
        runner = self.runners.get(name)
        if runner is None:
            self.require_ready()
            raise UnknownModel(f"no model named {name!r}; loaded: {sorted(self.runners)}")
        if task is not None and runner.manifest.task != task:
            raise UnknownModel(f"model {name!r} is a {runner.manifest.task} model, not {task}")
        return runner

    def _only_model_of(self, task: str | None) -> ModelRunner:
        of_task = [r for r in self.runners.values() if r.manifest.task == task]
        if len(of_task) == 1:
            return of_task[0]
        if not of_task:
            self.require_ready()
            raise UnknownModel(f"no {task} model is loaded")
        raise InvalidParameters(
            f"several {task} models are loaded; choose one with ?model= "
            f"({sorted(r.name for r in of_task)})"
        )

    def begin_drain(self) -> None:
        """Readiness turns false first, so load balancers stop sending before we stop."""
        self.draining = True
        self.ready = False

    def close_within(self, drain_timeout_s: float) -> None:
        """Start the drain clock now: at `drain_timeout_s` from now the batch queues close
        and every request they still hold fails with 503 and Retry-After (call from the
        event loop when the exit signal has been handled)."""
        self.begin_drain()
        self._drain_deadline = time.monotonic() + drain_timeout_s
        loop = asyncio.get_running_loop()
        loop.call_later(drain_timeout_s, lambda: loop.create_task(self.close(0.0)))

    async def close(self, drain_timeout_s: float) -> None:
        """Refuse new work, let queued and running batches finish by the drain deadline
        (the earlier of `drain_timeout_s` from now and the one `close_within` set), fail
        what is left, and release the engines. Later calls wait for the first one."""
        self.begin_drain()
        if self._closing is None:
            give_up_at = time.monotonic() + drain_timeout_s
            if self._drain_deadline is not None:
                give_up_at = min(give_up_at, self._drain_deadline)
            self._closing = asyncio.ensure_future(self._close(give_up_at))
        await asyncio.shield(self._closing)

    async def _close(self, give_up_at: float) -> None:
        if self._poller is not None:
            self._poller.cancel()
        remaining = max(give_up_at - time.monotonic(), 0.0)
        await asyncio.gather(
            *(runner.queue.close(remaining) for runner in self.runners.values()),
            *self._retiring,
            return_exceptions=True,
        )
        for runner in self.runners.values():
            runner.close_engines()
        self.decoder.shutdown(wait=False, cancel_futures=True)
