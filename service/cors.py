"""Calls from web pages served by other origins (CORS), allowed per origin
(`--cors-origin`): Starlette's CORS middleware, answering a refused preflight in the
service's JSON error shape instead of plain text.

What a page may send: GET and POST, with the headers the API reads (an API key,
a content type, a request id, the v2 binary header length). What its script may read
besides the body: the request id, Retry-After on 503, the 401 challenge and the v2
binary header length. Preflights are answered before the API key is checked (a
browser never sends credentials with them) and cached by the browser for 10 minutes.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from service.errors import error_body

ALLOWED_METHODS = ("GET", "POST")
ALLOWED_HEADERS = (
    "Authorization",
    "X-API-Key",
    "Content-Type",
    "X-Request-ID",
    "Inference-Header-Content-Length",
    "Server-Timing",
)
EXPOSED_HEADERS = (
    "X-Request-ID",
    "Retry-After",
    "WWW-Authenticate",
    "Inference-Header-Content-Length",
)
PREFLIGHT_MAX_AGE_S = 600
# An origin as browsers send it: scheme://host[:port], no path; or * for any.
ORIGIN = re.compile(r"^(\*|https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:\d{1,5})?)$")


def check_origin(origin: str) -> str:
    """`origin` as browsers write it in the Origin header (lowercase), or ValueError."""
    normal = origin.strip().lower()
    if not ORIGIN.match(normal):
        raise ValueError(
            f"{origin!r} is no origin: give scheme://host[:port] with no path or trailing "
            "slash (e.g. https://app.example.com), or * for pages from anywhere"
        )
    return normal


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORSMiddleware for `origins`, with the methods and headers above."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=ALLOWED_METHODS,
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            max_age=PREFLIGHT_MAX_AGE_S,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode()  # "Disallowed CORS origin, method, ..."
        what = refused.removeprefix("Disallowed CORS ")
        detail = (
            f"a browser may not send this request from {request_headers.get('origin')!r}: "
            f"its {what} {'is' if ',' not in what else 'are'} not allowed (--cors-origin)"
        )
        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-type", "content-length")
        }
        return JSONResponse(
            error_body("", "cors_refused", detail), response.status_code, headers=headers
        )
