"""The service's errors: each carries its HTTP status and a stable machine-readable code.

Client mistakes are 4xx with the fact needed to fix them; 500 is reserved for our own
failures (an engine that raised). Raised anywhere below the routes and turned into
`{"error": CODE, "detail": ...}` by the handlers installed in `service.app`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# The most characters of a detail an error sends. Details quote what the client sent (a
# v2 input's name, a model name), which only the upload limit bounds; over gRPC they
# travel in a trailer, percent-encoded (up to 3 bytes a character), and clients refuse
# trailers past 8 KiB by default, so an error quoting a megabyte of model name reached the
# client as "Stream removed" (RESOURCE_EXHAUSTED) instead of its own status.
MAX_DETAIL_CHARS = 2000


def bounded(detail: str) -> str:
    """`detail`, cut to MAX_DETAIL_CHARS and saying how much was cut."""
    if len(detail) <= MAX_DETAIL_CHARS:
        return detail
    cut = len(detail) - MAX_DETAIL_CHARS
    return f"{detail[:MAX_DETAIL_CHARS]}... ({cut} characters more)"


def validation_problems(errors: Iterable[Mapping[str, Any]], whole: str = "") -> str:
    """pydantic's errors as one sentence: `where: what` for each, `;`-separated (`whole`
    stands for an error about the whole object), without pydantic's "Value error, "."""
    return "; ".join(
        ": ".join(
            part
            for part in (
                ".".join(map(str, error["loc"])) or whole,
                error["msg"].removeprefix("Value error, "),
            )
            if part
        )
        for error in errors
    )


def error_body(path: str, code: str, detail: Any) -> dict[str, Any]:
    """`{"error": CODE, "detail": ...}`; under /v2 the Open Inference Protocol's
    `{"error": "CODE: detail"}`, whose one string its clients show. A text detail is
    `bounded`."""
    if isinstance(detail, str):
        detail = bounded(detail)
    if path.startswith("/v2"):
        return {"error": f"{code}: {detail}" if detail else code}
    return {"error": code, "detail": detail}


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, detail: Any = None, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class BadImage(ServiceError):
    status_code = 400
    code = "bad_image"


class UnknownModel(ServiceError):
    status_code = 404
    code = "unknown_model"


class RequestTimeout(ServiceError):
    status_code = 408
    code = "request_timeout"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidParameters(ServiceError):
    status_code = 422
    code = "invalid_parameters"


class Overloaded(ServiceError):
    status_code = 503
    code = "overloaded"


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"


class Timeout(ServiceError):
    status_code = 504
    code = "timeout"


class EngineFailure(ServiceError):
    status_code = 500
    code = "engine_error"


class ModelControlOff(ServiceError):
    """A load or unload asked of a server whose models load at start only."""

    status_code = 403
    code = "model_control_off"


class LogSettingsOff(ServiceError):
    """A change of the log settings asked of a server started without --allow-log-settings."""

    status_code = 403
    code = "log_settings_off"


class InvalidPriority(ServiceError):
    """A request's priority that is not one of its model's levels (--priority-levels)."""

    status_code = 400
    code = "invalid_priority"


class LoadFailed(ServiceError):
    """A model to load (explicit or poll model control) that did not load: the reason."""

    status_code = 400
    code = "load_failed"
