"""ASGI middleware: request ids, access logs and HTTP metrics; the limits on request
bodies (size, the shared buffer, the client's pace); closing a connection whose
request body was refused before it all arrived."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from prometheus_client import Gauge
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    error_body,
)
from service.logs import request_context
from service.metrics import ServiceMetrics

log = logging.getLogger("hornet.access")

# Where the request's id is kept in the ASGI scope, for handlers that run outside this
# middleware (Starlette's handler of unexpected exceptions).
REQUEST_ID_SCOPE_KEY = "hornet.request_id"


class RequestContextMiddleware:
    """Gives each request an id (an incoming valid X-Request-ID is honoured), echoes it
    in the response, counts the request by route template and status, times it, and
    writes one access log line. A request refused before routing (401, 413, 503 from
    the upload limits) is counted under the template of the first of `routes` its
    method and path match, so a dashboard shows it with its route; "unmatched" is a
    path no route has (404)."""

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = list(routes)

    def _route_template(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:
            full = (r for r in self.routes if r.matches(scope)[0] is Match.FULL)
            route = next(full, None)
        return getattr(route, "path", "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with request_context(dict(scope["headers"])) as rid:
            scope[REQUEST_ID_SCOPE_KEY] = rid
            await self._handle(scope, receive, send, rid)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        """The request answered under its ids: counted, timed and logged."""
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", rid.encode("latin-1")),
                ]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = self._route_template(scope)
            record_request(self.metrics, route, scope["method"], scope["path"], status, elapsed)


# The readiness probes' paths (REST and KServe v2), whose 503 is an answer, not a failure.
READINESS_PATHS = frozenset({"/readyz", "/v2/health/ready"})


def record_request(
    metrics: ServiceMetrics, route: str, method: str, path: str, status: int, seconds: float
) -> None:
    """A request answered (REST or gRPC): counted and timed under its route template (a
    gRPC method's path) and HTTP status, and its access log line written (a warning for a
    5xx, which --no-access-log keeps; but a readiness probe's 503, which says "not ready"
    while models load or the server drains, as it is meant to, every few seconds)."""
    metrics.requests.labels(route, str(status)).inc()
    metrics.latency.labels(route).observe(seconds)
    failed = status >= 500 and not (status == 503 and path in READINESS_PATHS)
    log.log(
        logging.WARNING if failed else logging.INFO,
        "request",
        extra={"method": method, "path": path, "status": status, "seconds": round(seconds, 6)},
    )


class CloseUnreadBodyMiddleware:
    """An answer that starts before the request's body has all arrived (401, 413, 408,
    503, or a route that did not need the body) says `connection: close`, and the server
    closes the connection after it. Otherwise uvicorn, to reach the next request on the
    connection, reads and throws away the rest of the body for as long as the client
    sends it. Clients that write the whole body before reading (httpx, requests) still
    read the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _declares_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        body_done = False

        async def watched_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, watched_receive, closing_send)


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request head announces a body: chunked, or a Content-Length over 0."""
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 ")):
            return True
    return False


class UploadBuffer:
    """The bytes of request bodies held by the requests in progress, all together,
    bounded. Each request's bound (--max-upload-mb) alone lets N slow clients hold N
    uploads; this bounds the sum. Used from the event loop only."""

    def __init__(self, capacity: int, gauge: Gauge | None = None) -> None:
        self.capacity = capacity
        self.held = 0
        self._gauge = gauge

    def reserve(self, size: int) -> bool:
        if self.held + size > self.capacity:
            return False
        self._set(self.held + size)
        return True

    def release(self, size: int) -> None:
        self._set(self.held - size)

    def refusal(self, size: int) -> Overloaded:
        """The 503 (with Retry-After) for a body of `size` bytes that does not fit."""
        return Overloaded(
            f"uploads in progress hold {self.held} of the server's {self.capacity} bytes for "
            f"request bodies; this one needs {size} (--max-upload-buffer-mb)",
            headers={"retry-after": "1"},
        )

    def _set(self, held: int) -> None:
        self.held = held
        if self._gauge is not None:
            self._gauge.set(held)


class UploadLimitsMiddleware:
    """What a request body may cost: at most `max_bytes` (413, at once from
    Content-Length, else while streaming); a place in the shared `buffer` for as long as
    the request runs (503 with Retry-After when it is full: declared sizes are reserved
    before a byte is read, chunked bodies as they arrive); and a client that sends
    nothing of a begun body for `client_timeout_s` gets 408 and its connection closed.
    Errors raised from `receive` reach the route as ServiceErrors."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, buffer: UploadBuffer, client_timeout_s: float
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.buffer = buffer
        self.client_timeout_s = client_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        size = int(declared) if declared is not None and declared.isdigit() else 0
        if size > self.max_bytes:
            await _send_error(scope, receive, send, PayloadTooLarge(self._too_large()))
            return
        if not self.buffer.reserve(size):
            await _send_error(scope, receive, send, self.buffer.refusal(size))
            return
        reserved, received, body_done = size, 0, False

        async def limited_receive() -> Message:
            nonlocal reserved, received, body_done
            if body_done:  # waiting for a disconnect while the answer is made: no clock
                return await receive()
            try:
                async with asyncio.timeout(self.client_timeout_s):  # no task, a timer
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"no part of the request body arrived for {self.client_timeout_s:g} s "
                    f"({received} bytes received; --client-timeout-s)",
                ) from None
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if received > self.max_bytes:
                raise PayloadTooLarge(self._too_large())
            if received > reserved:  # a chunked body: reserve as it arrives
                if not self.buffer.reserve(received - reserved):
                    raise self.buffer.refusal(received)
                reserved = received
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.buffer.release(reserved)

    def _too_large(self) -> str:
        return f"request body over the upload limit of {self.max_bytes} bytes (--max-upload-mb)"


async def _send_error(scope: Scope, receive: Receive, send: Send, error: ServiceError) -> None:
    """`error` as the routes' handlers answer it, before the app has run."""
    body = error_body(scope["path"], error.code, error.detail)
    await JSONResponse(body, error.status_code, error.headers)(scope, receive, send)
