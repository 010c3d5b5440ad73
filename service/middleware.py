"""ASGI middleware: request ids, access logs and HTTP metrics; the upload size limit."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge
from service.logs import request_id
from service.metrics import ServiceMetrics

log = logging.getLogger("hornet.access")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Where the request's id is kept in the ASGI scope, for handlers that run outside this
# middleware (Starlette's handler of unexpected exceptions).
REQUEST_ID_SCOPE_KEY = "hornet.request_id"


class RequestContextMiddleware:
    """Gives each request an id (an incoming valid X-Request-ID is honoured), echoes it
    in the response, counts the request by route template and status, times it, and
    writes one access log line."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope[REQUEST_ID_SCOPE_KEY] = rid
        token = request_id.set(rid)
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
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "seconds": round(elapsed, 6),
                },
            )
            request_id.reset(token)


class BodySizeLimitMiddleware:
    """Refuses request bodies over the limit: at once from Content-Length, else while
    streaming (the route sees a PayloadTooLarge error from `receive`)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            code, detail = PayloadTooLarge.code, self._detail()
            if scope["path"].startswith("/v2"):  # the Open Inference Protocol's error shape
                body: dict = {"error": f"{code}: {detail}"}
            else:
                body = {"error": code, "detail": detail}
            await _send_json(send, 413, body)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self._detail())
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self) -> str:
        return f"request body over the upload limit of {self.max_bytes} bytes (--max-upload-mb)"


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
