"""API keys: the middleware that asks for one, and the OpenAPI document that says so.

Off unless keys are configured (settings.api_keys, settings.api_key_file). A request
shows its key as `Authorization: Bearer KEY` or `X-API-Key: KEY`; the probes and
/metrics stay open unless settings.protect_probes, and the API docs and the try-it page
(which holds no secret: it asks the user for a key) always do. Keys and
the headers carrying them are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from fastapi import FastAPI
from pydantic import SecretStr
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_body
from service.schemas import ErrorResponse, V2ErrorResponse

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
PAGE_PATHS = frozenset({"/", "/static/page.js", "/static/page.css"})  # service.routers.page
API_KEY_HEADER = "X-API-Key"
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


class ApiKeyMiddleware:
    """Answers 401 to requests without one of `keys`, on every protected path; with no
    keys it passes everything through. Refusals come before routing; the request
    metrics count them under the route template the path matches, status 401."""

    def __init__(self, app: ASGIApp, keys: Sequence[SecretStr], protect_probes: bool) -> None:
        self.app = app
        self._keys = [key.get_secret_value().encode() for key in keys]
        self._protect_probes = protect_probes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self._keys
            or not is_protected(scope["path"], self._protect_probes)
        ):
            await self.app(scope, receive, send)
            return
        refusal = key_refusal(presented_keys(scope["headers"]), self._keys)
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


def advertise_api_keys(app: FastAPI, keys: Sequence[SecretStr], protect_probes: bool) -> None:
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
