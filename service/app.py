"""`create_app(settings)`: the one place the ASGI application is assembled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from hornet_bundle import Bundle
from service import __version__
from service.auth import PROBE_PATHS, ApiKeyMiddleware, KeyRing, advertise_api_keys
from service.batching import retrieve_exception
from service.cors import CorsMiddleware
from service.engines import create_engine
from service.errors import ServiceError, error_body
from service.grpc_v2.server import start_server as start_grpc_server
from service.logs import request_id
from service.metrics import ServiceMetrics
from service.middleware import (
    REQUEST_ID_SCOPE_KEY,
    CloseUnreadBodyMiddleware,
    RequestContextMiddleware,
    UploadBuffer,
    UploadLimitsMiddleware,
)
from service.routers import health, inference, models, page, v2
from service.runtime import ClientDisconnected, EngineFactory, ModelPool
from service.settings import Settings
from service.tls import ServedCertificate

log = logging.getLogger("hornet.service")


def create_app(
    settings: Settings,
    *,
    bundles: Sequence[Bundle] | None = None,
    engine_factory: EngineFactory = create_engine,
) -> FastAPI:
    """The service over `settings.bundle_dirs` (or already verified `bundles`).

    Models load and warm up in the background after startup, so /healthz answers at once
    and /readyz turns 200 when they are done. `engine_factory` is the seam tests use to
    put instrumented engines behind real bundles.
    """
    metrics = ServiceMetrics()
    pool = ModelPool(settings, metrics, engine_factory, bundles=bundles)
    # Request bodies held at once, REST and gRPC together.
    uploads = UploadBuffer(settings.upload_buffer_bytes, metrics.upload_buffer)
    # The API keys, REST and gRPC together; the key file read again when it changes.
    keys = KeyRing(settings.api_keys, settings.api_key_file)
    # The TLS pair, HTTP and gRPC together; read again when its files change.
    certificate = (
        ServedCertificate(
            settings.tls_certfile,
            settings.tls_keyfile,
            lambda outcome: metrics.tls_certificate_reloads.labels(outcome).inc(),
        )
        if settings.tls_certfile is not None
        else None
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(pool.load())
        loading.add_done_callback(retrieve_exception)
        releasing = asyncio.create_task(pool.releaser.run())
        grpc_server = (
            await start_grpc_server(pool, settings, metrics, uploads, keys, certificate)
            if settings.grpc_port
            else None
        )
        try:
            yield
        finally:
            pool.begin_drain()
            if grpc_server is not None:
                await grpc_server.stop(settings.drain_timeout_s)
            loading.cancel()
            releasing.cancel()
            await asyncio.gather(loading, releasing, return_exceptions=True)
            await pool.close(settings.drain_timeout_s)
            await asyncio.to_thread(pool.tracing.shutdown)  # the last spans exported
            log.info("shut down")

    app = FastAPI(
        title="HorNet Serve",
        summary="Dynamically batched HorNet classification, segmentation and detection",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.certificate = certificate
    routers = (health.router, models.router, inference.router, v2.router, page.router)
    for router in routers:
        app.include_router(router)
    routes = [route for router in routers for route in router.routes]
    _install_error_handlers(app, routes)
    app.add_middleware(
        UploadLimitsMiddleware,
        max_bytes=settings.max_upload_bytes,
        buffer=uploads,
        client_timeout_s=settings.client_timeout_s,
    )
    app.add_middleware(ApiKeyMiddleware, keys=keys, protect_probes=settings.protect_probes)
    app.add_middleware(CloseUnreadBodyMiddleware)
    if settings.cors_origins:  # outside the key check: preflights carry no key
        app.add_middleware(CorsMiddleware, origins=settings.cors_origins)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, routes=routes)
    advertise_api_keys(app, keys.enabled, settings.protect_probes)
    return app


def probes_only(app: ASGIApp) -> ASGIApp:
    """`app` as --metrics-port serves it: /metrics and the health probes go to the app,
    through all its middleware (API keys with --protect-probes, request ids, metrics);
    any other path is answered 404 here, so the port serves nothing else."""
    served = ", ".join(sorted(PROBE_PATHS))

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PROBE_PATHS:
            path = scope["path"]
            detail = f"{path} is not served on the metrics port (it serves {served})"
            answer = JSONResponse(error_body(path, "not_found", detail), 404)
            # a body sent with it is not read: the connection closes after the answer
            await CloseUnreadBodyMiddleware(answer)(scope, receive, send)
            return
        await app(scope, receive, send)

    return serve


def _error(
    request: Request,
    status: int,
    code: str,
    detail: object,
    headers: dict | None = None,
    *,
    rid: str | None = None,
) -> JSONResponse:
    """The error's body in the shape of its path (service.errors.error_body). A 5xx, our
    own failure, also carries `request_id` (the X-Request-ID header), for the user to
    quote and the operator to find in the logs."""
    body = error_body(request.url.path, code, detail)
    if status >= 500 and rid is not None:
        body["request_id"] = rid
    return JSONResponse(body, status_code=status, headers=headers)


def _allowed_methods(routes: Sequence[BaseRoute], path: str) -> str:
    """The Allow header of a 405: every method of every route at `path` (Starlette's names
    only the first route's, where GET and POST are two routes)."""
    methods = {
        method
        for route in routes
        if isinstance(route, Route) and route.methods and route.path_regex.match(path)
        for method in route.methods
    }
    return ", ".join(sorted(methods))


def _install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("request failed", extra={"error": exc.code, "detail": str(exc.detail)})
        return _error(
            request, exc.status_code, exc.code, exc.detail, exc.headers, rid=request_id.get()
        )

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        """The client hung up while its body was read: nobody is left to answer, so no
        error line; counted as 499, like a client that leaves while queued."""
        gone = ClientDisconnected("the client closed the connection while sending its body")
        return _error(request, gone.status_code, gone.code, gone.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"loc": list(err["loc"]), "msg": err["msg"], "input": str(err.get("input"))[:200]}
            for err in exc.errors()
        ]
        return _error(request, 422, "invalid_parameters", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(routes, request.url.path)}
        return _error(request, exc.status_code, code, exc.detail, headers, rid=request_id.get())

    # Starlette runs this handler outside every middleware, after RequestContextMiddleware
    # has reset its context; the id it gave the request is kept in the request's scope.
    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request.scope.get(REQUEST_ID_SCOPE_KEY)
        token = request_id.set(rid)
        try:
            log.exception("unhandled error")
        finally:
            request_id.reset(token)
        headers = {"X-Request-ID": rid} if rid else None
        return _error(request, 500, "internal_error", f"{type(exc).__name__}", headers, rid=rid)
