"""Structured JSON logs; every line written while handling a request carries its id,
and its trace id when the request came with a W3C `traceparent` (a service mesh or an
instrumented client), so that the lines can be found from the trace."""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import NamedTuple, TextIO

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hornet_request_id", default=None
)
trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hornet_trace_id", default=None
)


class TraceParent(NamedTuple):
    """A valid `traceparent`'s trace id and parent span id (lowercase hex), and whether
    its caller sampled the trace (service.tracing follows it)."""

    trace_id: str
    span_id: str
    sampled: bool


trace_parent: contextvars.ContextVar[TraceParent | None] = contextvars.ContextVar(
    "hornet_trace_parent", default=None
)
# W3C Trace Context's traceparent: version-trace_id-parent_id-flags, lowercase hex. A
# future version may append fields after a dash; version ff is invalid.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # an X-Request-ID kept as given


@contextlib.contextmanager
def request_context(headers: Mapping[bytes, bytes]) -> Iterator[str]:
    """The ids every log line written while a request is handled carries (REST headers
    and gRPC metadata alike): its id, the client's `x-request-id` when valid or a new one,
    and the trace id of a valid `traceparent`. Yields the request id."""
    incoming = headers.get(b"x-request-id", b"").decode("latin-1")
    rid = incoming if VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
    id_token = request_id.set(rid)
    parent = parse_traceparent(headers.get(b"traceparent", b"").decode("latin-1"))
    parent_token = trace_parent.set(parent)
    trace_token = trace_id.set(None if parent is None else parent.trace_id)
    try:
        yield rid
    finally:
        request_id.reset(id_token)
        trace_id.reset(trace_token)
        trace_parent.reset(parent_token)


def parse_traceparent(traceparent: str) -> TraceParent | None:
    """A valid `traceparent` header's value, else None (a malformed or all-zero one is
    ignored, as the specification asks of a receiver)."""
    match = _TRACEPARENT.match(traceparent.strip()) if len(traceparent) <= 512 else None
    if match is None:
        return None
    version, trace, parent, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or not int(trace, 16) or not int(parent, 16):
        return None
    return TraceParent(trace, parent, bool(int(flags, 16) & 1))


_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's: its message's template with terminal colour codes
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        trace = trace_id.get()
        if trace is not None:
            entry["trace_id"] = trace
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Triton's log settings (its logging extension) as this server keeps them: the severities
# written and the verbose (debug) lines; the log goes to standard error as JSON lines.
LOG_FORMAT = "json"
_SEVERITIES = {"log_info": "info", "log_warnings": "warnings", "log_errors": "errors"}
MAX_VERBOSE_LEVEL = 2**32 - 1  # Triton's log_verbose_level is a uint32
LOG_SETTINGS = (*_SEVERITIES, "log_verbose_level", "log_format", "log_file")
# The loggers configure_logging routes; their levels follow the switches.
_ROUTED = ("hornet", "uvicorn", "uvicorn.error")


class LogSwitches(logging.Filter):
    """Which of the server's log lines are written, as Triton's logging extension sets
    them (GET and POST /v2/logging, gRPC LogSettings): info, warning and error lines each
    on or off, and the debug lines on while `verbose_level` is above 0 (the server has one
    verbose level: any above 0 writes them all). A filter on the log's handler; the routed
    loggers' levels follow, so that a line no switch lets through is not even made.
    Critical lines, and `log_always`'s, are written whatever the switches say."""

    def __init__(self) -> None:
        super().__init__()
        self.info = self.warnings = self.errors = True
        self.verbose_level = 0

    def start_at(self, level: str) -> None:
        """The switches of a --log-level: every severity from it up on, below it off."""
        threshold = logging.getLevelName(level.upper())
        if not isinstance(threshold, int):
            raise ValueError(f"unknown log level {level!r}")
        self.info = threshold <= logging.INFO
        self.warnings = threshold <= logging.WARNING
        self.errors = threshold <= logging.ERROR
        self.verbose_level = int(threshold <= logging.DEBUG)
        self._set_levels()

    def filter(self, record: logging.LogRecord) -> bool:
        level = record.levelno
        if level >= logging.CRITICAL or getattr(record, "_always", False):
            return True
        if level >= logging.ERROR:
            return self.errors
        if level >= logging.WARNING:
            return self.warnings
        if level >= logging.INFO:
            return self.info
        return self.verbose_level > 0

    def settings(self) -> dict[str, bool | int | str]:
        """The settings in Triton's names and types."""
        return {
            "log_file": "",
            **{name: getattr(self, field) for name, field in _SEVERITIES.items()},
            "log_verbose_level": self.verbose_level,
            "log_format": LOG_FORMAT,
        }

    def update(self, changes: Mapping[str, object]) -> dict[str, bool | int | str]:
        """Apply `changes` (Triton's names: only those given change), all of them or,
        with a ValueError naming every one that cannot be taken, none; the settings then."""
        problems = [p for name, value in changes.items() if (p := _refusal(name, value))]
        if problems:
            raise ValueError("; ".join(problems))
        for name, value in changes.items():
            if name in _SEVERITIES:
                setattr(self, _SEVERITIES[name], value)
            elif name == "log_verbose_level":
                self.verbose_level = _whole(value)
        self._set_levels()
        return self.settings()

    def _set_levels(self) -> None:
        """The loggers' level: the lowest severity a switch lets through (a line below it
        is not made at all, e.g. the access lines with info off)."""
        on = [
            (self.verbose_level > 0, logging.DEBUG),
            (self.info, logging.INFO),
            (self.warnings, logging.WARNING),
            (self.errors, logging.ERROR),
        ]
        lowest = next((level for enabled, level in on if enabled), logging.CRITICAL)
        for name in _ROUTED:
            logging.getLogger(name).setLevel(lowest)


def _whole(value: object) -> int | None:
    """`value` as JSON Schema's integer, which the OpenAPI document promises: an int, or a
    number with no fractional part (`2.0`); never a boolean. None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, float) and value.is_integer() else None


def _refusal(name: str, value: object) -> str | None:
    """Why log setting `name` cannot take `value`, or None when it can."""
    if name in _SEVERITIES:
        return None if isinstance(value, bool) else f"{name} is a boolean"
    if name == "log_verbose_level":
        whole = _whole(value)
        fits = whole is not None and 0 <= whole <= MAX_VERBOSE_LEVEL
        return None if fits else f"log_verbose_level is an integer from 0 to {MAX_VERBOSE_LEVEL}"
    if name == "log_format":
        return (
            None
            if value == LOG_FORMAT
            else f"log_format is {LOG_FORMAT!r} only: the server writes JSON lines (Triton's "
            "'default' and 'ISO8601' text formats are not written)"
        )
    if name == "log_file":
        return (
            None
            if value == ""
            else "log_file is '' only: the server writes its log to standard error, never to "
            "a file a request names"
        )
    return f"unknown log setting {name!r}; the settings: {', '.join(LOG_SETTINGS)}"


# The server's switches: one log per process.
log_switches = LogSwitches()


def log_always(logger: logging.Logger, message: str, **extra: object) -> None:
    """A warning line written whatever the log settings (its logger's level and the
    switches): a change of the settings themselves is always recorded."""
    record = logger.makeRecord(
        logger.name, logging.WARNING, "(log_always)", 0, message, (), None,
        extra={**extra, "_always": True},
    )  # fmt: skip
    logger.handle(record)  # handle, unlike warning(), does not look at the level


class LineWriter:
    """Writes log lines to a stream from a thread of its own, so that no thread that logs
    (the event loop above all) ever waits for the stream: a standard error that is read
    slowly or not at all (a full pipe: a container runtime's log driver that blocks, a
    stalled collector) held the event loop in its write, and after 281 requests the server
    answered nothing, probes included. Lines wait up to `capacity_bytes` in all; past it
    the newest are dropped and counted (`dropped`), and once everything waiting is written
    a line says how many were lost. A process exiting waits up to FLUSH_TIMEOUT_S for the
    rest."""

    FLUSH_TIMEOUT_S = 2.0
    # Woken by a line, the writer waits this long for more before it writes them all: at
    # most 100 wake-ups a second whatever the rate of lines (one per line cost the event
    # loop 5% of the demo classifier's requests/s in a GIL and futex hand-off each).
    LINGER_S = 0.01
    _MOST_AT_ONCE = 1024  # lines in one write

    def __init__(self, stream: TextIO, capacity_bytes: int) -> None:
        self._stream = stream
        self._capacity = capacity_bytes
        self._lines: collections.deque[str] = collections.deque()
        self._bytes = 0  # waiting, or being written
        self._ready = threading.Condition()
        self._waiting = False  # the writer waits for a line: the next one wakes it
        self.dropped = 0  # in all, since the start
        self._unreported = 0
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush, self.FLUSH_TIMEOUT_S)

    def put(self, line: str) -> None:
        with self._ready:
            if self._bytes + len(line) > self._capacity:
                self.dropped += 1
                self._unreported += 1  # to be said, once the rest is written
            else:
                self._lines.append(line)
                self._bytes += len(line)
            if self._waiting:  # (flush may wait on the condition too: wake all)
                self._waiting = False
                self._ready.notify_all()

    def _run(self) -> None:
        from service import thread_names

        thread_names.set_current(thread_names.LOG)
        while True:
            with self._ready:
                while not self._lines and not self._unreported:
                    self._waiting = True
                    self._ready.wait()
            time.sleep(self.LINGER_S)  # the lines that come meanwhile go in the same write
            with self._ready:
                count = min(len(self._lines), self._MOST_AT_ONCE)
                lines = [self._lines.popleft() for _ in range(count)]
                size = sum(map(len, lines))
                if self._unreported and not self._lines:  # said once all is written
                    lines.append(_dropped_line(self._unreported))
                    self._unreported = 0
            try:
                self._stream.write("".join(lines))
                self._stream.flush()
            except (OSError, ValueError):  # a closed stream: nothing can be said there
                pass
            with self._ready:
                self._bytes -= size
                self._ready.notify_all()

    def flush(self, timeout_s: float) -> None:
        """Wait until every line waiting is written, `timeout_s` at most."""
        with self._ready:
            self._ready.wait_for(lambda: self._bytes == 0, timeout_s)


def _dropped_line(count: int) -> str:
    """The line saying how many lines were dropped, as the service's other lines are."""
    record = logging.getLogger("hornet.service").makeRecord(
        "hornet.service", logging.WARNING, "(log writer)", 0,
        "log lines dropped: standard error was not read fast enough", (), None,
        extra={"dropped": count},
    )  # fmt: skip
    return JsonFormatter().format(record) + "\n"


class _QueuedHandler(logging.Handler):
    """Formats a record where it is logged (the JSON line reads the request's context
    there) and hands the line to the writer."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging.Handler's own policy
            self.handleError(record)
            return
        self.writer.put(line + "\n")


_writer: LineWriter | None = None


def flush_logging() -> None:
    """Write every log line waiting (LineWriter.FLUSH_TIMEOUT_S at most): before a line
    printed to standard error directly, so that it comes after them (an exit's reason is
    the process's last line)."""
    if _writer is not None:
        _writer.flush(LineWriter.FLUSH_TIMEOUT_S)


def dropped_lines() -> int:
    """Log lines dropped since the start because standard error was read too slowly."""
    return 0 if _writer is None else _writer.dropped


def configure_logging(
    level: str = "info", access_log: bool = True, buffer_bytes: int = 4 << 20
) -> None:
    """Route the service's and uvicorn's logs to stderr as JSON lines, through
    `log_switches` set from `level`, written by a thread of their own that holds
    `buffer_bytes` of lines at most (LineWriter); without `access_log`, the lines of
    requests answered below 500 are left out."""
    global _writer
    if _writer is None:
        _writer = LineWriter(sys.stderr, buffer_bytes)
    handler = _QueuedHandler(_writer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(log_switches)
    for name in _ROUTED:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    log_switches.start_at(level)
    # Every other logger's warnings and errors (asyncio's, gRPC's Python layer, Python's
    # warnings through "py.warnings") as lines of the same log, not plain text written to
    # standard error by logging's last resort, or by `warnings`, from whichever thread
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    # python-multipart writes a warning for each malformed part of a client's body (the
    # request's 400 and its access line say it already): only its errors are written
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    # OpenTelemetry's exporter (--trace-endpoint): a line for each batch of spans it could
    # not deliver, not one for each retry
    exporter = logging.getLogger("opentelemetry")
    exporter.handlers, exporter.propagate = [handler], False
    exporter.setLevel(logging.ERROR)
    access = logging.getLogger("hornet.access")
    # the access lines are info lines; without access_log only the 5xx ones (warnings)
    access.setLevel(logging.NOTSET if access_log else logging.WARNING)
    logging.getLogger("uvicorn.access").disabled = True
