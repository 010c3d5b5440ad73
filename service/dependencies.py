"""Shared resources for routes (settings, model pool, metrics) and the upload reader."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import InvalidParameters, PayloadTooLarge, UnsupportedMediaType
from service.imaging import SUPPORTED_CONTENT_TYPES
from service.metrics import ServiceMetrics
from service.runtime import ModelPool
from service.settings import Settings


# Dependencies are `async def`: FastAPI runs a plain `def` one in its thread pool, a
# thread hand-off per request per dependency (bench/README.md, server efficiency).
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_pool(request: Request) -> ModelPool:
    return request.app.state.pool


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def request_deadline(request: Request, timeout_s: float | None = None) -> float:
    """The time.monotonic() instant by which the request must be answered: within
    --request-timeout-s, or the client's own `timeout_s` where that is sooner."""
    allowed = request.app.state.settings.request_timeout_s
    return time.monotonic() + (allowed if timeout_s is None else min(allowed, timeout_s))


async def read_uploads(request: Request) -> list[bytes]:
    """The uploaded images' bytes in upload order: repeated multipart `file` fields, or
    a raw body with an image content type."""
    settings: Settings = request.app.state.settings
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_multipart(request, settings.max_images_per_request)
    if media_type in SUPPORTED_CONTENT_TYPES:
        return [await request.body()]
    raise UnsupportedMediaType(
        f"content type {media_type or '(none)'!r} is not accepted; send multipart/form-data "
        f"with 'file' fields or a raw body of one of {sorted(SUPPORTED_CONTENT_TYPES)}"
    )


async def _read_multipart(request: Request, max_images: int) -> list[bytes]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
    except StarletteHTTPException as exc:  # python-multipart stopped at a limit we set
        if "files" in str(exc.detail):
            raise PayloadTooLarge(
                f"more than {max_images} images in one request; the limit is {max_images} "
                "(HORNET_MAX_IMAGES_PER_REQUEST)"
            ) from exc
        raise
    try:
        files = form.getlist("file")
        if not files:
            raise InvalidParameters(
                f"multipart body has no 'file' field (fields: {sorted(set(form.keys()))})"
            )
        if len(files) > max_images:
            raise PayloadTooLarge(f"{len(files)} images in one request; the limit is {max_images}")
        not_files = [i for i, f in enumerate(files) if not isinstance(f, UploadFile)]
        if not_files:
            raise InvalidParameters(f"'file' fields {not_files} are text, not file uploads")
        return [await upload.read() for upload in files]
    finally:
        await form.close()


Pool = Annotated[ModelPool, Depends(get_pool)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]
