"""Structured JSON logs; every line written while handling a request carries its id,
and its trace id when the request came with a W3C `traceparent` (a service mesh or an
instrumented client), so that the lines can be found from the trace."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hornet_request_id", default=None
)
trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hornet_trace_id", default=None
)
# W3C Trace Context's traceparent: version-trace_id-parent_id-flags, lowercase hex. A
# future version may append fields after a dash; version ff is invalid.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?$")


VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # an X-Request-ID kept as given


@contextlib.contextmanager
def request_context(headers: Mapping[bytes, bytes]) -> Iterator[str]:
    """The ids every log line written while a request is handled carries (REST headers
    and gRPC metadata alike): its id, the client's `x-request-id` when valid or a new one,
    and the trace id of a valid `traceparent`. Yields the request id."""
    incoming = headers.get(b"x-request-id", b"").decode("latin-1")
    rid = incoming if VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
    id_token = request_id.set(rid)
    trace_token = trace_id.set(trace_id_of(headers.get(b"traceparent", b"").decode("latin-1")))
    try:
        yield rid
    finally:
        request_id.reset(id_token)
        trace_id.reset(trace_token)


def trace_id_of(traceparent: str) -> str | None:
    """The trace id of a valid `traceparent` header's value, else None (a malformed or
    all-zero one is ignored, as the specification asks of a receiver)."""
    match = _TRACEPARENT.match(traceparent.strip()) if len(traceparent) <= 512 else None
    if match is None:
        return None
    version, trace, parent, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or not int(trace, 16) or not int(parent, 16):
        return None
    return trace


_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
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


def configure_logging(level: str = "info", access_log: bool = True) -> None:
    """Route the service's and uvicorn's logs to stderr as JSON lines; without
    `access_log`, the lines of requests answered below 500 are left out."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("hornet", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    access = logging.getLogger("hornet.access")
    access.setLevel(logging.NOTSET if access_log else max(logging.WARNING, access.parent.level))
    logging.getLogger("uvicorn.access").disabled = True
