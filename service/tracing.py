"""OpenTelemetry traces of inference requests, and Triton's trace extension that sets them.

With `--trace-endpoint URL` (an OTLP/HTTP collector's traces URL) a sampled inference
request (the image routes, KServe v2 REST and gRPC ModelInfer, a stream's requests each)
becomes a server span with one child per stage the model's statistics count
(compute_input, queue, compute_infer, compute_output: the Server-Timing figures, with
their start and end), exported in batches by OpenTelemetry's SDK on a thread of its own.

Which requests are sampled follows the W3C `traceparent` the request came with, where it
is valid (the spans join that trace; its sampled flag decides, as OpenTelemetry's
parent-based sampling does: a mesh or client that traces a request gets the server's part
of it, one that does not is not overruled); otherwise one request in `trace_rate` starts a
trace of its own (the first, then every trace_rate-th, counted per model setting), while
`trace_count` (-1: no limit) traces remain. The settings are Triton's (`GET/POST
/v2/trace/setting`, `/v2/models/{model}/trace/setting`, gRPC TraceSetting): a model's own
settings override the server's, a null value clears a model's own setting (and restores a
server setting's value at start). Spans wait in a bounded queue (OpenTelemetry's
BatchSpanProcessor: 2048 by default, `OTEL_BSP_*`), dropped when the collector cannot keep
up; requests never wait for the collector. The exporter takes OpenTelemetry's own
variables for the rest (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_CERTIFICATE`,
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from service import __version__
from service.errors import InvalidParameters, ServiceError
from service.logs import TraceParent, log_always, request_id, trace_id, trace_parent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from service.statistics import RequestTimes

log = logging.getLogger("hornet.service")

LEVELS = ("OFF", "TIMESTAMPS")
# The settings a trace setting request may name: those it may change, and those it reads
# only (this server exports to OpenTelemetry, not to a file).
CHANGEABLE = ("trace_level", "trace_rate", "trace_count")
READ_ONLY = {"log_frequency": "0", "trace_file": "", "trace_mode": "opentelemetry"}
# The largest trace_rate and trace_count taken, by the --trace-rate and --trace-count flags
# (service.settings) and by trace setting requests.
MAX_SETTING = 2**31 - 1


def decimal_pattern(maximum: int) -> str:
    """A regular expression (unanchored) for the integers 1..`maximum` written in ASCII
    digits without leading zeros: those with fewer digits than `maximum`, then for each
    digit of `maximum` the numbers that share its digits before it and have a lower one
    there, then `maximum` itself (2147: [1-9][0-9]{0,2}|1[0-9]{3}|20[0-9]{2}|21[0-3][0-9]|
    214[0-6]|2147)."""
    top = str(maximum)
    parts = [f"[1-9][0-9]{{0,{len(top) - 2}}}"] if len(top) > 1 else []
    for at, digit in enumerate(top):
        low, high = (1 if at == 0 else 0), int(digit) - 1
        if high >= low:
            rest = len(top) - at - 1
            parts.append(f"{top[:at]}[{low}-{high}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "|".join([*parts, top])


# What trace_rate and trace_count take, as the OpenAPI document states them too: decimal
# strings, 1 to MAX_SETTING (the count also -1, no limit, and 0, no more traces).
SETTING_PATTERNS = {
    "trace_rate": f"^(?:{decimal_pattern(MAX_SETTING)})$",
    "trace_count": f"^(?:-1|0|{decimal_pattern(MAX_SETTING)})$",
}
SHUTDOWN_TIMEOUT_S = 5.0


class TraceSettingsOff(ServiceError):
    status_code = 403
    code = "trace_settings_off"


@dataclasses.dataclass
class _Scope:
    """The settings given at one level (the server's, or one model's): None where a
    model's own setting is not set. `seen` counts the requests without a parent decided
    at this level's rate."""

    level: str | None = None
    rate: int | None = None
    count: int | None = None
    seen: int = 0


class Tracing:
    """The server's trace settings and, with an endpoint, its OpenTelemetry exporter."""

    def __init__(
        self, endpoint: str | None, *, rate: int = 1000, count: int = -1, changeable: bool = False
    ) -> None:
        self.changeable = changeable
        self._initial = _Scope("TIMESTAMPS" if endpoint else "OFF", rate, count)
        self._server = dataclasses.replace(self._initial)
        self._models: dict[str, _Scope] = {}
        # The counts and settings: REST and gRPC requests all decide on the event loop,
        # the lock keeps them right for a caller on another thread too.
        self._lock = threading.Lock()
        self._provider = None if endpoint is None else _provider(endpoint)
        self._tracer = None if self._provider is None else self._provider.get_tracer("hornet")

    # ---- the settings (Triton's trace extension)

    def settings(self, model: str | None = None) -> dict[str, Any]:
        """The settings in force for `model` (the server's where None), as Triton writes
        them: strings, and the level as a list."""
        with self._lock:
            level, rate, count = self._effective(model)
        return {
            "trace_level": [level],
            "trace_rate": str(rate),
            "trace_count": str(count),
            **READ_ONLY,
        }

    def update(self, changes: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
        """Apply `changes` (Triton's form: a string or a list of one string per setting,
        None to clear): all or none; the settings after them. No change is a read."""
        if not changes:
            return self.settings(model)
        if not self.changeable:
            raise TraceSettingsOff(
                "the trace settings are read-only here: start the server with "
                "--allow-trace-settings to change them"
            )
        parsed = self._parse(changes)
        with self._lock:
            scope = self._server if model is None else self._models.setdefault(model, _Scope())
            before = self._effective(model)
            for name, value in parsed.items():
                if value is None:  # cleared: a model's falls back to the server's
                    value = None if model is not None else getattr(self._initial, name)
                setattr(scope, name, value)
                if name == "rate":
                    scope.seen = 0
            after = self._effective(model)
        before = dict(zip(CHANGEABLE, before, strict=True))
        after = dict(zip(CHANGEABLE, after, strict=True))
        log_always(log, "trace settings changed", model=model, before=before, after=after)
        return self.settings(model)

    def _parse(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        problems, parsed = [], {}
        for name, raw in changes.items():
            if name in READ_ONLY:
                value = _one_string(raw)
                if raw is not None and value != READ_ONLY[name]:
                    problems.append(f"{name}: this server takes only {READ_ONLY[name]!r}")
                continue
            if name not in CHANGEABLE:
                problems.append(
                    f"{name}: not a trace setting (these are: "
                    + ", ".join((*CHANGEABLE, *READ_ONLY))
                    + ")"
                )
                continue
            if raw is None:
                parsed[name.removeprefix("trace_")] = None
                continue
            value = _one_string(raw)
            if value is None:
                problems.append(f"{name}: a string, or a list of one string")
            elif name == "trace_level":
                if value not in LEVELS:
                    levels = ", ".join(LEVELS)
                    problems.append(f"trace_level: {value[:40]!r} is not one of {levels}")
                elif value != "OFF" and self._tracer is None:
                    problems.append(
                        "trace_level: no trace is exported without --trace-endpoint, so only "
                        "OFF is taken"
                    )
                else:
                    parsed["level"] = value
            elif re.fullmatch(SETTING_PATTERNS[name], value) is None:
                low = 1 if name == "trace_rate" else -1
                problems.append(
                    f"{name}: {value[:40]!r} is not an integer from {low} to {MAX_SETTING} "
                    "in decimal digits"
                )
            else:
                parsed[name.removeprefix("trace_")] = int(value)
        if problems:
            raise InvalidParameters("; ".join(problems))
        return parsed

    def _effective(self, model: str | None) -> tuple[str, int, int]:
        own = self._models.get(model) if model is not None else None
        return tuple(  # type: ignore[return-value]
            getattr(own, name)
            if own is not None and getattr(own, name) is not None
            else getattr(self._server, name)
            for name in ("level", "rate", "count")
        )

    # ---- the requests

    def _sampled(self, model: str, parent: TraceParent | None) -> bool:
        """Whether a request for `model` is traced; counts it against the settings."""
        with self._lock:
            own = self._models.get(model)
            level, rate, count = self._effective(model)
            if level == "OFF" or count == 0:
                return False
            if parent is not None:
                if not parent.sampled:
                    return False
            else:
                scope = own if own is not None and own.rate is not None else self._server
                scope.seen += 1
                if (scope.seen - 1) % rate:
                    return False
            if count > 0:
                counted = own if own is not None and own.count is not None else self._server
                counted.count = count - 1
            return True

    @contextlib.contextmanager
    def request(
        self, model: str, times: RequestTimes, span: Callable[[], tuple[str, dict[str, Any]]]
    ) -> Iterator[None]:
        """One inference request for `model`, traced if sampled: its server span (named
        and attributed by `span`, called only then: `http_span`, `grpc_span`) ends with
        the block, its stages' spans taken from `times`, its status the error that ended
        it, if one did."""
        parent = trace_parent.get()
        if self._tracer is None or not self._sampled(model, parent):
            yield
            return
        name, attributes = span()
        traced = _Traced(self._tracer, model, name, attributes, parent)
        # The request's log lines from here to its end carry the trace's id, its access
        # line too: not reset here but with the rest of the request's context
        # (service.logs.request_context; a stream's requests each run in a task of their own).
        trace_id.set(traced.trace_id)
        try:
            yield
        except BaseException as exc:
            traced.end(times, exc)
            raise
        traced.end(times, None)

    def shutdown(self) -> None:
        """Export what is queued and stop the exporter, waiting SHUTDOWN_TIMEOUT_S at most
        (a collector that is down would hold the SDK's shutdown for its export timeout and
        retries; its threads are daemons, so the process does not wait for them)."""
        if self._provider is None:
            return
        stopping = threading.Thread(
            target=self._provider.shutdown, name="trace-export-stop", daemon=True
        )
        stopping.start()
        stopping.join(SHUTDOWN_TIMEOUT_S)


class _Traced:
    """A sampled request's server span, and its stages' spans when it ends."""

    def __init__(
        self,
        tracer: Any,
        model: str,
        name: str,
        attributes: Mapping[str, Any],
        parent: TraceParent | None,
    ) -> None:
        from opentelemetry import trace

        context = None
        if parent is not None:
            remote = trace.SpanContext(
                int(parent.trace_id, 16),
                int(parent.span_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        self._tracer = tracer
        self._trace = trace
        self._span = tracer.start_span(
            name,
            context=context,
            kind=trace.SpanKind.SERVER,
            attributes={
                "hornet.model": model,
                "hornet.request_id": request_id.get() or "",
                **attributes,
            },
        )
        self.trace_id = format(self._span.get_span_context().trace_id, "032x")
        self.http = "http.request.method" in attributes

    def end(self, times: RequestTimes, error: BaseException | None) -> None:
        trace, span = self._trace, self._span
        span.set_attribute("hornet.images", times.images)
        offset = time.time_ns() - time.monotonic_ns()  # monotonic to the epoch's
        context = trace.set_span_in_context(span)
        for stage, started, ended in times.intervals:
            child = self._tracer.start_span(
                stage, context=context, start_time=round(started * 1e9) + offset
            )
            child.end(end_time=round(ended * 1e9) + offset)
        status = 200
        if error is not None:
            code = getattr(error, "code", type(error).__name__)
            span.set_attribute("error.type", code)
            status = error.status_code if isinstance(error, ServiceError) else 500
            if status >= 500:  # a client's mistake is not the server's error (semconv)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code}: {error}"[:500]))
        if self.http:
            span.set_attribute("http.response.status_code", status)
        span.end()


def http_span(route: str, path: str) -> tuple[str, dict[str, Any]]:
    """A POST's span name and attributes (OpenTelemetry's HTTP server conventions)."""
    attributes = {"http.request.method": "POST", "http.route": route, "url.path": path}
    return f"POST {route}", attributes


def grpc_span(service: str, method: str) -> tuple[str, dict[str, Any]]:
    """A gRPC call's span name and attributes (OpenTelemetry's RPC conventions)."""
    return f"{service}/{method}", {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
    }


def _provider(endpoint: str) -> TracerProvider:
    """OpenTelemetry's SDK exporting over OTLP/HTTP to `endpoint`, in batches."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, where set, over these
    ours = Resource.create({"service.name": "hornet-serve", "service.version": __version__})
    resource = ours.merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def _one_string(value: Any) -> str | None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, str) else None
