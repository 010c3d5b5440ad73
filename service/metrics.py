"""Prometheus metrics, one CollectorRegistry per app so tests can build several apps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from service.batching import BatchStats, ClosedBy
from service.logs import dropped_lines

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# libjpeg's scaled decodes (--jpeg-reducing-gap): 1 is a full decode, every format's.
REDUCTIONS = (1, 2, 4, 8)


class ServiceMetrics:
    """The service's instruments; `for_model` gives the batcher its observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hornet_requests",
            "HTTP requests answered",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hornet_request_seconds",
            "end-to-end request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "hornet_in_flight_requests", "requests being handled", registry=self.registry
        )
        self.queue_seconds = Histogram(
            "hornet_queue_seconds",
            "time an item waited for its batch, by its priority level (1 where the model has "
            "one level: --priority-levels)",
            ["model", "priority"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "hornet_batch_size",
            "items per engine call",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batches = Counter(
            "hornet_batches",
            "batches formed, by what closed them: full (--max-batch-size), early (nothing "
            "more queued or being decoded), delay (--max-delay-ms passed first), split (its "
            "share of the work ahead, the rest left to idle instances)",
            ["model", "closed_by"],
            registry=self.registry,
        )
        self.solo_batches = Counter(
            "hornet_solo_batches",
            "batches run by the solo engine (--solo-engine), which runs a lone request "
            "while every instance is idle; counted in hornet_batches_total too",
            ["model"],
            registry=self.registry,
        )
        self.decode_seconds = Histogram(
            "hornet_decode_seconds",
            "decoding and preprocessing time per image, in a decoding thread",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decoded_images = Counter(
            "hornet_decoded_images",
            "images decoded, by the scale they were decoded at: reduction 1 in full, 2, 4 "
            "or 8 a JPEG decoded at 1/2, 1/4 or 1/8 of its size (--jpeg-reducing-gap)",
            ["model", "reduction"],
            registry=self.registry,
        )
        self.engine_seconds = Histogram(
            "hornet_engine_seconds",
            "engine time per batch",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.engine_failures = Counter(
            "hornet_engine_failures",
            "batches whose engine call failed",
            ["model"],
            registry=self.registry,
        )
        self.model_requests = Counter(
            "hornet_model_requests",
            "inference requests for a model (the image routes and v2 infer, REST or gRPC), "
            "by outcome: success (answered) or failure (a bad image, a full queue, a "
            "timeout, an engine failure, a client gone); counted once the body is read",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.model_request_seconds = Histogram(
            "hornet_model_request_seconds",
            "a model's successful inference requests, from the body read to the answer ready",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_images = Counter(
            "hornet_model_images",
            "images in a model's successful inference requests",
            ["model"],
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "hornet_cache_lookups",
            "uploads looked up in a model's response cache (--response-cache-mib), by "
            "result: hit (answered from it) or miss",
            ["model", "result"],
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "hornet_cache_bytes",
            "bytes a model's response cache holds (its entries' arrays and overhead)",
            ["model"],
            registry=self.registry,
        )
        self.model_control = Counter(
            "hornet_model_control",
            "loads and unloads of models while the server runs (--model-control-mode "
            "explicit or poll), by model, action (load, unload) and outcome (success, "
            "failure: the model did not load)",
            ["model", "action", "outcome"],
            registry=self.registry,
        )
        self.http_connections = Gauge(
            "hornet_http_connections",
            "HTTP connections open, by listener (api: --port, metrics: --metrics-port; each "
            "at most --max-connections; over TLS, handshakes in progress included)",
            ["listener"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "hornet_connections_refused",
            "HTTP connections answered 503 (429 past --max-connections-per-client) and closed "
            "as they opened, by listener: its port held --max-connections (over TLS closed "
            "before the handshake, with no answer)",
            ["listener"],
            registry=self.registry,
        )
        self.tls_certificate_reloads = Counter(
            "hornet_tls_certificate_reloads",
            "changes of the --tls-certfile/--tls-keyfile files read while serving, by "
            "outcome: success (new connections are served the new pair), failure (it did not "
            "load: the pair read last is still served)",
            ["outcome"],
            registry=self.registry,
        )
        self.upload_buffer = Gauge(
            "hornet_upload_buffer_bytes",
            "bytes of request bodies reserved by requests in progress",
            registry=self.registry,
        )
        self.queue_depth_gauge = Gauge(
            "hornet_queue_depth", "items waiting for a batch", ["model"], registry=self.registry
        )
        self.registry.register(_DroppedLogLines())

    def for_model(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)


class _DroppedLogLines(Collector):
    """hornet_log_lines_dropped_total, read from the log writer at each scrape."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "hornet_log_lines_dropped",
            "log lines dropped because standard error was read too slowly to take them "
            "(--log-buffer-kib)",
            value=dropped_lines(),
        )


class ModelObserver:
    """Feeds one model's batcher events into the service metrics."""

    def __init__(self, metrics: ServiceMetrics, model: str) -> None:
        self._depth = metrics.queue_depth_gauge.labels(model)
        # per priority level, made as levels are first seen (level 1 from the start)
        self._queue = {1: metrics.queue_seconds.labels(model, "1")}
        self._queue_seconds, self._model = metrics.queue_seconds, model
        self._batch = metrics.batch_size.labels(model)
        self._closed_by = {
            reason: metrics.batches.labels(model, reason) for reason in get_args(ClosedBy)
        }
        self._engine = metrics.engine_seconds.labels(model)
        self._solo = metrics.solo_batches.labels(model)
        self._failures = metrics.engine_failures.labels(model)
        self._decode = metrics.decode_seconds.labels(model)
        self._decoded = {r: metrics.decoded_images.labels(model, str(r)) for r in REDUCTIONS}
        self._succeeded = metrics.model_requests.labels(model, "success")
        self._failed = metrics.model_requests.labels(model, "failure")
        self._request_seconds = metrics.model_request_seconds.labels(model)
        self._images = metrics.model_images.labels(model)
        self._cache = {r: metrics.cache_lookups.labels(model, r) for r in ("hit", "miss")}
        self._cache_bytes = metrics.cache_bytes.labels(model)

    def request_done(self, seconds: float, images: int) -> None:
        """A successful inference request of `images` images, in `seconds`."""
        self._succeeded.inc()
        self._request_seconds.observe(seconds)
        self._images.inc(images)

    def request_failed(self) -> None:
        self._failed.inc()

    def cache_looked_up(self, hits: int, misses: int) -> None:
        """A request's uploads looked up in the response cache."""
        self._cache["hit"].inc(hits)
        self._cache["miss"].inc(misses)

    def cache_holds(self, size: int) -> None:
        """The response cache's bytes, once a request's results were put in."""
        self._cache_bytes.set(size)

    def image_prepared(self, seconds: float, reduction: int) -> None:
        """One upload decoded (at 1/`reduction` of its size) and preprocessed."""
        self._decode.observe(seconds)
        self._decoded[reduction].inc()

    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def batch_done(self, stats: BatchStats) -> None:
        self._batch.observe(stats.size)
        self._closed_by[stats.closed_by].inc()
        if stats.solo:
            self._solo.inc()
        self._engine.observe(stats.compute_seconds)
        levels = stats.levels or [1] * len(stats.queue_seconds)
        for seconds, level in zip(stats.queue_seconds, levels, strict=True):
            queue = self._queue.get(level)
            if queue is None:
                queue = self._queue[level] = self._queue_seconds.labels(self._model, str(level))
            queue.observe(seconds)
        if stats.failed and not stats.cancelled:
            self._failures.inc()
