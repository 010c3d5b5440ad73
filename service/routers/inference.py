"""The inference routes: classify, segment, detect. Parse, call the model, shape."""

from __future__ import annotations

import functools
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, Request, Response

from service.dependencies import Pool, read_uploads, request_deadline
from service.imaging import SUPPORTED_CONTENT_TYPES
from service.pipelines import AnswerOptions
from service.runtime import ModelRunner
from service.schemas import (
    SERVER_TIMING_HEADER,
    UINT64_MAX,
    ClassifyResponse,
    DetectResponse,
    ErrorResponse,
    SegmentResponse,
    error_responses,
)
from service.statistics import SERVER_TIMING, RequestTimes
from service.tracing import http_span

router = APIRouter(tags=["inference"])

ResponseModel = TypeVar("ResponseModel", ClassifyResponse, SegmentResponse, DetectResponse)

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "one or more images: repeated multipart 'file' upload fields, or the "
        "raw bytes of one image with its image content type",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary", "minLength": 1},
                            "minItems": 1,
                            "description": "the images, one file upload each, in order",
                        }
                    },
                    "required": ["file"],
                }
            },
            **{
                t: {"schema": {"type": "string", "format": "binary", "minLength": 1}}
                for t in sorted(SUPPORTED_CONTENT_TYPES)
            },
        },
    }
}
_ERRORS = error_responses(
    ErrorResponse,
    {
        400: "bad_image: an upload is empty, truncated or not decodable; bad_request: a "
        "malformed multipart body; invalid_priority: a priority that is not one of the "
        "model's levels",
        404: "unknown_model: no model of that name, the named model serves another task, "
        "or no model of this task is loaded",
        413: "payload_too_large: the body is over --max-upload-mb, more images than "
        "max_images_per_request, or an image over --max-pixels",
        415: "unsupported_media_type: the content type is neither multipart/form-data nor a "
        "supported image type, or an upload is no supported image format",
        422: "invalid_parameters: a query parameter out of range, a multipart body without "
        "'file' uploads, or several models of the task loaded and none chosen",
        500: "engine_error: the engine failed on this request's batch; internal_error",
        503: "overloaded: the model's queue is full; not_ready: models are loading or the "
        "server is draining",
        504: "timeout: no answer within --request-timeout-s",
    },
)
_RESPONSES = {200: {"headers": SERVER_TIMING_HEADER}, **_ERRORS}
ModelName = Annotated[
    str | None,
    Query(description="model name; optional when one model of the task is loaded"),
]


Priority = Annotated[
    int,
    Query(
        ge=0,
        le=UINT64_MAX,
        description="priority level: 1 (the highest) to the model's --priority-levels; 0, "
        "the model's default level (--default-priority-level)",
    ),
]
TimeoutMs = Annotated[
    int | None,
    Query(
        ge=1,
        le=UINT64_MAX // 1000,
        description="the client's deadline in milliseconds, where sooner than "
        "--request-timeout-s: past it 504, and 503 at once when the work queued ahead "
        "would outlast it",
    ),
]


async def _answer(
    request: Request,
    answer: Response,
    runner: ModelRunner,
    response: type[ResponseModel],
    options: AnswerOptions,
    priority: int,
    timeout_ms: int | None,
) -> ResponseModel:
    """Every uploaded image through the runner's pipeline: decode and prepare, infer at
    the priority asked for, finish each answer off the event loop, in upload order; timed
    in the model's statistics once the uploads are read."""
    deadline = request_deadline(request, None if timeout_ms is None else timeout_ms / 1000)
    level = runner.priority_level(priority)  # before the upload is read and decoded
    path, times = request.url.path, RequestTimes()
    span = functools.partial(http_span, path, path)
    traced = request.app.state.pool.tracing.request(runner.name, times, span)
    with traced, runner.in_use():  # an unload or reload answers this request first
        return await _answered(request, answer, runner, response, options, level, deadline, times)


async def _answered(
    request: Request,
    answer: Response,
    runner: ModelRunner,
    response: type[ResponseModel],
    options: AnswerOptions,
    level: int,
    deadline: float,
    times: RequestTimes,
) -> ResponseModel:
    uploads = await read_uploads(request)
    with runner.statistics.request(times):
        with times.measure("compute_input"):
            prepared = await runner.prepare(
                uploads, times, deadline=deadline, is_gone=request.is_disconnected
            )
        results = await runner.infer(
            prepared, deadline=deadline, is_gone=request.is_disconnected, times=times, level=level
        )
        with times.measure("compute_output"):
            if runner.pipeline.finish_is_light(options):  # on the event loop
                finish = runner.pipeline.finish
                answers = [finish(p, r, options) for p, r in zip(prepared, results, strict=True)]
            else:
                answers = await runner.answers(
                    prepared, results, options, deadline=deadline, is_gone=request.is_disconnected
                )
    answer.headers[SERVER_TIMING] = times.server_timing()
    return response(model=runner.name, results=list(answers))


@router.post(
    "/classify", response_model=ClassifyResponse, responses=_RESPONSES, openapi_extra=_UPLOAD_BODY
)
async def classify(
    request: Request,
    answer: Response,
    pool: Pool,
    model: ModelName = None,
    top_k: Annotated[
        int, Query(ge=1, le=100_000, description="classes per image")
    ] = AnswerOptions.top_k,
    priority: Priority = 0,
    timeout_ms: TimeoutMs = None,
) -> ClassifyResponse:
    """Top-k softmax probabilities per image, in upload order."""
    runner = pool.get(model, "classify")
    options = AnswerOptions(top_k=top_k)
    return await _answer(request, answer, runner, ClassifyResponse, options, priority, timeout_ms)


@router.post(
    "/segment", response_model=SegmentResponse, responses=_RESPONSES, openapi_extra=_UPLOAD_BODY
)
async def segment(
    request: Request,
    answer: Response,
    pool: Pool,
    model: ModelName = None,
    priority: Priority = 0,
    timeout_ms: TimeoutMs = None,
) -> SegmentResponse:
    """Per image: the class-index mask at the image's size and the classes present."""
    runner = pool.get(model, "segment")
    options = AnswerOptions()
    return await _answer(request, answer, runner, SegmentResponse, options, priority, timeout_ms)


@router.post(
    "/detect", response_model=DetectResponse, responses=_RESPONSES, openapi_extra=_UPLOAD_BODY
)
async def detect(
    request: Request,
    answer: Response,
    pool: Pool,
    model: ModelName = None,
    score_threshold: Annotated[float, Query(ge=0.0, le=1.0)] = AnswerOptions.score_threshold,
    priority: Priority = 0,
    timeout_ms: TimeoutMs = None,
) -> DetectResponse:
    """Per image: boxes in input pixels, labels, scores and COCO RLE instance masks."""
    runner = pool.get(model, "detect")
    options = AnswerOptions(score_threshold=score_threshold)
    return await _answer(request, answer, runner, DetectResponse, options, priority, timeout_ms)
