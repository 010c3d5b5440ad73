"""API keys: the middleware that asks for one, and the OpenAPI document that says so.

Off unless keys are configured (settings.api_keys, settings.api_key_file). A request
shows its key as `Authorization: Bearer KEY` or `X-API-Key: KEY`; the probes and
/metrics stay open unless settings.protect_probes, and the API docs and the try-it page
(which holds no secret: it asks the user for a key) always do. Keys and
the headers carrying them are never logged. The key file is read again when it changes
(`KeyRing`), so keys rotate without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import FastAPI
from pydantic import SecretStr
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_body
from service.schemas import ErrorResponse, V2ErrorResponse
from service.watched import file_stamp

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
PAGE_PATHS = frozenset({"/", "/static/page.js", "/static/page.css"})  # service.routers.page
API_KEY_HEADER = "X-API-Key"
log = logging.getLogger("hornet.service")
CHALLENGE = 'Bearer realm="hornet"'

_MISSING = "this route needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
_WRONG = "the API key sent is not one of the server's keys"


def key_matches(candidate: bytes, keys: Sequence[bytes]) -> bool:
    """Whether `candidate` is one of `keys`, in time independent of which key (if any) it
    equals and of the keys' lengths: every key is compared, as SHA-256 digests of equal
    length, each in constant time."""
    digest = hashlib.sha256(candidate).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key).digest())
    return matched


def key_refusal(presented: Sequence[bytes], keys: Sequence[bytes]) -> str | None:
    """Why a request showing `presented` keys is refused (none shown, or none of them
    one of `keys`), or None when one of them is a key: REST's headers and gRPC's
    metadata (HTTP/2 headers too) alike."""
    if any(key_matches(key, keys) for key in presented):
        return None
    return _WRONG if presented else _MISSING


def is_protected(path: str, protect_probes: bool) -> bool:
    """Whether a request to `path` (or an OpenAPI path template) needs a key."""
    if path in DOCS_PATHS or path in PAGE_PATHS:
        return False
    return protect_probes or path not in PROBE_PATHS


def presented_keys(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """The keys a request shows: each Bearer token and each X-API-Key value."""
    keys = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                keys.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            keys.append(value.strip())
    return keys


# How often the key file's metadata is looked at (one stat call) while requests come.
KEY_FILE_CHECK_S = 1.0


class KeyRing:
    """The keys a request may present: the settings' own (`fixed`) and the lines of the
    key file (`path`), read again whenever the file changes (checked at most every
    KEY_FILE_CHECK_S, as a request asks). A mounted Kubernetes Secret is updated in place
    when the Secret changes, so keys rotate without a restart: add the next key, move the
    clients, remove the old one. A file that can no longer be read, or holds no key, keeps
    the keys read last (logged): it never opens the server. Used from the event loop."""

    def __init__(
        self,
        fixed: Sequence[SecretStr],
        path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from service.settings import read_api_key_file  # settings imports service modules

        self._read = read_api_key_file
        self._fixed = _encoded(fixed)
        self._path, self._clock = path, clock
        self._from_file: list[bytes] = []
        self._stamp: tuple[int, ...] | None = None
        self._failure: str | None = None  # why the file's latest change was not taken
        self._checked_at = clock()
        if path is not None:  # at start an unreadable or keyless file is an error
            self._stamp = file_stamp(path)
            self._from_file = _encoded(self._read(path))

    @property
    def enabled(self) -> bool:
        """Whether keys are asked for: fixed for the server's life (a key file may change
        its keys, never remove them all)."""
        return bool(self._fixed) or self._path is not None

    def keys(self) -> list[bytes]:
        if self._path is not None and self._clock() - self._checked_at >= KEY_FILE_CHECK_S:
            self._checked_at = self._clock()
            self._reload(self._path)
        return self._fixed + self._from_file

    def _reload(self, path: Path) -> None:
        try:
            stamp = file_stamp(path)
            if stamp == self._stamp:
                return
            keys = _encoded(self._read(path))
        except (OSError, ValueError) as exc:  # ValueError names the file, never a key
            reason = f"cannot read it: {exc.strerror}" if isinstance(exc, OSError) else str(exc)
            if reason != self._failure:  # said once, not at every check
                self._failure = reason
                log.error(
                    "API key file changed and was not taken: the keys read last stay",
                    extra={"path": str(path), "reason": reason},
                )
            return
        self._stamp, self._from_file, self._failure = stamp, keys, None
        log.info("API key file read again", extra={"path": str(path), "keys": len(keys)})


def _encoded(keys: Sequence[SecretStr]) -> list[bytes]:
    return [key.get_secret_value().encode() for key in keys]


class ApiKeyMiddleware:
    """Answers 401 to requests without one of the ring's keys, on every protected path;
    with no keys it passes everything through. Refusals come before routing; the request
    metrics count them under the route template the path matches, status 401."""

    def __init__(self, app: ASGIApp, keys: KeyRing, protect_probes: bool) -> None:
        self.app = app
        self._keys = keys
        self._protect_probes = protect_probes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self._keys.enabled
            or not is_protected(scope["path"], self._protect_probes)
        ):
            await self.app(scope, receive, send)
            return
        refusal = key_refusal(presented_keys(scope["headers"]), self._keys.keys())
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await _unauthorized(scope["path"], refusal)(scope, receive, send)


def _unauthorized(path: str, refusal: str) -> JSONResponse:
    """401 with a Bearer challenge; the body in the service's error shape, or under /v2
    the Open Inference Protocol's one string (as service.app's error handlers do)."""
    body = error_body(path, "unauthorized", refusal)
    challenge = f'{CHALLENGE}, error="invalid_token"' if refusal == _WRONG else CHALLENGE
    return JSONResponse(body, 401, headers={"www-authenticate": challenge})


def advertise_api_keys(app: FastAPI, keys: bool, protect_probes: bool) -> None:
    """With keys, `app.openapi` adds the two ways to send one as security schemes, and
    to every protected operation their requirement and a 401 response; without keys the
    document stays FastAPI's own."""
    if keys:
        app.openapi = _secured_openapi(app, app.openapi, protect_probes)


def _secured_openapi(
    app: FastAPI, default: Callable[[], dict], protect_probes: bool
) -> Callable[[], dict]:
    def openapi() -> dict:
        if app.openapi_schema is None:
            _add_security(default(), protect_probes)  # default() caches it in app.openapi_schema
        return app.openapi_schema

    return openapi


def _add_security(document: dict, protect_probes: bool) -> None:
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(
        {
            "HTTPBearer": {"type": "http", "scheme": "bearer"},
            "APIKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
        }
    )
    schemas = components.setdefault("schemas", {})
    for model in (ErrorResponse, V2ErrorResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.setdefault(model.__name__, schema)
    for path, operations in document.get("paths", {}).items():
        if not is_protected(path, protect_probes):
            continue
        model = V2ErrorResponse if path.startswith("/v2") else ErrorResponse
        unauthorized = {
            "description": "no API key, or not one of the server's keys",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
        for operation in operations.values():
            operation["security"] = [{"HTTPBearer": []}, {"APIKeyHeader": []}]
            operation.setdefault("responses", {})["401"] = unauthorized
