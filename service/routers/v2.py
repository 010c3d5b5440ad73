"""The Open Inference Protocol (KServe v2) REST routes, next to the service's own routes.

Standard clients (tritonclient, KServe clients, perf_analyzer) work unchanged. Requests
go through the same model pool, pipeline, batcher, limits, metrics and error handlers as
/classify; errors answer `{"error": "CODE: what was wrong"}`. Classification bundles take
their graph's image tensor (uint8, or float32 on the 0-255 scale, NHWC at the input size)
or encoded images as BYTES (decoded and preprocessed exactly as /classify does) and
answer `logits` and `probabilities`; segmentation bundles take the tile tensor and answer
the graph's raw tile logits; detection bundles take one encoded image per request and
answer /detect's detections of it as tensors (unbatched; see docs/kserve-v2.md). Each
pipeline declares those tensors and turns them into its items and back; this module keeps
the protocol's part: parsing, binary data, request options, the response encoding and
the classification extension.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service import __version__, kserve, tracing
from service.batching import IsGone
from service.dependencies import Pool, request_deadline
from service.errors import (
    InvalidParameters,
    InvalidPriority,
    LogSettingsOff,
    PayloadTooLarge,
    UnknownModel,
)
from service.kserve import BYTES, InvalidInferRequest, OutputTensor, Tensor
from service.logs import LOG_SETTINGS, MAX_VERBOSE_LEVEL, log_always, log_switches
from service.pipelines import AnswerOptions, Prepared, ServedTensor, TensorOutputs
from service.runtime import ModelPool, ModelRunner
from service.schemas import (
    RETRY_AFTER,
    SERVER_TIMING_HEADER,
    UINT64_MAX,
    V2ErrorResponse,
    V2InferResponse,
    V2LogSettings,
    V2ModelIndex,
    V2ModelMetadata,
    V2ModelReady,
    V2ServerLive,
    V2ServerMetadata,
    V2ServerReady,
    V2StatisticsResponse,
    V2TraceSettings,
    error_responses,
)
from service.settings import Settings
from service.statistics import SERVER_TIMING, RequestTimes

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

SERVER_NAME = "hornet-serve"
log = logging.getLogger("hornet.service")

EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "logging",
    "model_configuration",
    "model_repository",
    "statistics",
    "trace",
]
MODEL_VERSION = "1"
SCORE_THRESHOLD = "score_threshold"
PRIORITY = "priority"
TIMEOUT = "timeout"
# Triton's platform and backend names for each --engine (Triton's OpenVINO backend has no
# platform name of its own: its models name the backend).
_PLATFORMS = {
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "tensorrt": ("tensorrt_plan", "tensorrt"),
    "torch": ("pytorch_libtorch", "pytorch"),
}


def _metadata(tensor: ServedTensor) -> dict:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}


def _config(tensor: ServedTensor, *, batched: bool, **extra: Any) -> dict:
    """Triton's dims leave out the batch axis of a batched model's tensors."""
    return {
        "name": tensor.name,
        "data_type": f"TYPE_{'STRING' if tensor.datatype == BYTES else tensor.datatype}",
        "dims": tensor.shape[1:] if batched else tensor.shape,
        **extra,
    }


def find_model(pool: ModelPool, name: str, version: str | None) -> ModelRunner:
    """The named model, found while others still load (metadata answers then); a bundle
    has the one version."""
    runner = pool.get(name, ready=False)
    if version not in (None, MODEL_VERSION):
        raise UnknownModel(f"model {name!r} has only version {MODEL_VERSION}, not {version!r}")
    return runner


def _inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs written in place, because in an OpenAPI
    document a '#/$defs/...' reference would be read from the document's root."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


_NOT_READY = "not_ready: models are loading (or failed to) or the server is draining"
_UNKNOWN = "unknown_model: no model of that name, or no such version of it"
_INVALID = "invalid_parameters: a parameter that does not validate"
_MODEL_ERRORS = error_responses(
    V2ErrorResponse,
    {404: _UNKNOWN, 422: _INVALID, 503: f"{_NOT_READY}, and no model of that name is loaded yet"},
)
_READY_ERRORS = {
    **_MODEL_ERRORS,
    **error_responses(
        V2ModelReady | V2ErrorResponse,
        {
            503: f"{_NOT_READY}: the model's name and ready false; for a name not loaded "
            "yet, an error"
        },
    ),
}
_INFER_ERRORS = error_responses(
    V2ErrorResponse,
    {
        400: "invalid_infer_request: not an inference request, or its inputs do not fit the "
        "model (name, shape, datatype, element count, values, base64, more than one image "
        "for a detect model), or a score_threshold outside 0..1; "
        "bad_image: an encoded image that does not decode",
        404: _UNKNOWN,
        413: "payload_too_large: the body is over --max-upload-mb, its JSON could hold more "
        "than --max-listed-elements elements (send those with the binary extension), more "
        "images than max_images_per_request, or an encoded image over --max-pixels",
        415: "unsupported_media_type: an encoded image in no supported format",
        422: _INVALID,
        500: "engine_error: the engine failed on this request's batch; internal_error",
        503: f"overloaded: the model's queue is full; {_NOT_READY}",
        504: "timeout: no answer within --request-timeout-s",
    },
)
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "an inference request as JSON, or with the binary tensor extension "
        "its JSON header followed by the inputs' bytes (see docs/kserve-v2.md)",
        "content": {
            "application/json": {"schema": _inlined(kserve.InferRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
            },
        },
    },
    "parameters": [
        {
            "name": kserve.HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "the JSON header's byte count when binary tensor data follows it",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
}
_INFER_OK = {
    "description": "the outputs as JSON, or with binary outputs the JSON header (of "
    "Inference-Header-Content-Length bytes) followed by their bytes",
    "headers": SERVER_TIMING_HEADER,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


@router.get("", response_model=V2ServerMetadata)
async def server_metadata() -> dict:
    """Server name, version and the protocol extensions it supports."""
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", response_model=V2ServerLive)
async def server_live() -> dict:
    """200 while the process answers."""
    return {"live": True}


@router.get(
    "/health/ready",
    response_model=V2ServerReady,
    responses={
        503: {
            "model": V2ServerReady,
            "description": _NOT_READY,
            "headers": RETRY_AFTER,
        }
    },
)
async def server_ready(pool: Pool) -> JSONResponse:
    """200 once every model is loaded and warmed up; 503 while loading or draining."""
    if pool.ready:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": "5"})


def statistics(pool: ModelPool, name: str, version: str | None) -> dict:
    """Triton's statistics extension: requests, images, batches and where their time went
    since the server started, for the named model or (name empty) every loaded model."""
    runners = [find_model(pool, name, version)] if name else list(pool.runners.values())
    return {"model_stats": [r.statistics.as_dict(r.name, MODEL_VERSION) for r in runners]}


@router.post(
    "/repository/index",
    response_model=list[V2ModelIndex],
    response_model_exclude_none=True,
    responses=error_responses(V2ErrorResponse, {
        413: "payload_too_large: a body over 4096 bytes",
        422: "invalid_parameters: a body that is not a JSON object with an optional "
        "boolean 'ready'",
    }),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {
                "type": "object",
                "properties": {"ready": {"type": "boolean"}},
            }}},
        }
    },
)  # fmt: skip
async def repository_index(request: Request, pool: Pool) -> list[dict]:
    """Triton's repository index: every bundle the server was given (with
    --model-control-mode explicit or poll, every bundle it may load), its version and state
    (READY, LOADING, or UNAVAILABLE with the reason); with `{"ready": true}` the ready
    ones only."""
    return repository_entries(pool, _index_ready_only(await request.body()))


def repository_entries(pool: ModelPool, ready_only: bool) -> list[dict]:
    entries = pool.index()
    return [e for e in entries if e["state"] == "READY"] if ready_only else entries


# A repository request (the index's `{"ready": true}`, a load's or unload's parameters)
# is small: a body past this is refused before it is parsed (413), so that it never costs
# the event loop a large JSON parse.
MAX_INDEX_BODY = 4096


def _small_json(body: bytes, what: str, holds: str = "") -> Any:
    """A repository request's body parsed: {} when empty, None when not JSON; 413 past
    MAX_INDEX_BODY (`what` the request, `holds` what it may hold, for the refusal)."""
    if len(body) > MAX_INDEX_BODY:
        raise PayloadTooLarge(
            f"{what} of {len(body)} bytes; it takes at most {MAX_INDEX_BODY}{holds}"
        )
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _index_ready_only(body: bytes) -> bool:
    parsed = _small_json(body, "a repository index request", ' ({"ready": true} or nothing)')
    ready = parsed.get("ready", False) if isinstance(parsed, dict) else None
    if not isinstance(ready, bool):
        raise InvalidParameters(
            "a repository index request is empty or a JSON object with an optional boolean 'ready'"
        )
    return ready


_CONTROL_ERRORS = error_responses(V2ErrorResponse, {
    400: "load_failed: the model's bundle did not load (the reason; a version in service "
    "goes on serving)",
    403: "model_control_off: the server was not started with --model-control-mode explicit",
    404: "unknown_model: no bundle of a model of that name",
    413: "payload_too_large: a body over 4096 bytes",
    422: "invalid_parameters: a body that is not a JSON object with at most the "
    "parameters named",
    503: "not_ready: the server is shutting down",
})  # fmt: skip


# A load or unload done: 200 with an empty body, as Triton answers (no content documented).
_CONTROL_DONE: dict[int | str, dict[str, Any]] = {200: {"description": "done; no body"}}


def _control_body(parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {
                "type": "object",
                "properties": {"parameters": {
                    "type": "object", "properties": parameters, "additionalProperties": False,
                }},
                "additionalProperties": False,
            }}},
        }
    }  # fmt: skip


@router.post(
    "/repository/models/{model}/load",
    response_class=Response,
    responses={**_CONTROL_DONE, **_CONTROL_ERRORS},
    openapi_extra=_control_body({}),
)
async def load_model(request: Request, pool: Pool, model: str) -> Response:
    """Triton's model control (with --model-control-mode explicit): load the model's
    bundle from its directory, verified and warmed, and serve it; a model already served
    goes on answering until the new one is ready, and is then retired once the requests
    holding it are answered. 200 with an empty body once it serves. Triton's config and
    file overrides are refused: a model's settings come from --model-setting, its files
    from its bundle."""
    _control_parameters(await request.body(), {})
    await pool.load_model(model)
    return Response(status_code=200)


@router.post(
    "/repository/models/{model}/unload",
    response_class=Response,
    responses={**_CONTROL_DONE, **_CONTROL_ERRORS},
    openapi_extra=_control_body({"unload_dependents": {"type": "boolean"}}),
)
async def unload_model(request: Request, pool: Pool, model: str) -> Response:
    """Triton's model control (with --model-control-mode explicit): stop serving the
    model (requests for it get 404 from now), answer the requests it holds (those still
    waiting after --drain-timeout-s get 503) and close its engines; 200 with an empty
    body then. Unloading a model not loaded does nothing. `unload_dependents` is taken
    and has no effect (no model here depends on another)."""
    _control_parameters(await request.body(), {"unload_dependents": bool})
    await pool.unload_model(model)
    return Response(status_code=200)


def _control_parameters(body: bytes, allowed: dict[str, type]) -> dict[str, Any]:
    """The `parameters` of a load or unload request (empty, or `{"parameters": {...}}`
    with only the `allowed` names, of their types), bounded as the index request is."""
    parsed = _small_json(body, "a model control request")
    parameters = parsed.get("parameters", {}) if isinstance(parsed, dict) else None
    fits = (
        isinstance(parsed, dict)
        and set(parsed) <= {"parameters"}
        and isinstance(parameters, dict)
        and all(isinstance(parameters.get(k), t) for k, t in allowed.items() if k in parameters)
    )
    unknown = sorted(set(parameters) - set(allowed)) if isinstance(parameters, dict) else []
    if not fits or unknown:
        taken = ", ".join(f"{k} ({t.__name__})" for k, t in allowed.items()) or "none"
        said = f"; not taken: {', '.join(map(repr, unknown))}" if unknown else ""
        raise InvalidParameters(
            "a model control request is empty or a JSON object with an optional "
            f"'parameters' object; the parameters taken: {taken}{said} (a model's settings "
            "come from --model-setting, its files from its bundle)"
        )
    return parameters


_LOG_SETTINGS_ERRORS = error_responses(V2ErrorResponse, {
    403: "log_settings_off: a change asked of a server started without --allow-log-settings",
    413: "payload_too_large: a body over 4096 bytes",
    422: "invalid_parameters: a body that is not a JSON object of the settings, each of its "
    "type and a value this server takes (every one refused is named; none is applied)",
})  # fmt: skip


@router.get("/logging", response_model=V2LogSettings)
async def get_log_settings() -> dict:
    """Triton's logging extension: the log settings (the severities written, whether the
    verbose lines are)."""
    return log_switches.settings()


@router.post(
    "/logging",
    response_model=V2LogSettings,
    responses=_LOG_SETTINGS_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {
                "type": "object",
                "properties": {
                    "log_file": {"type": "string", "enum": [""]},
                    "log_info": {"type": "boolean"},
                    "log_warnings": {"type": "boolean"},
                    "log_errors": {"type": "boolean"},
                    "log_verbose_level": {
                        "type": "integer", "minimum": 0, "maximum": MAX_VERBOSE_LEVEL,
                    },
                    "log_format": {"type": "string", "enum": ["json"]},
                },
                "additionalProperties": False,
            }}},
        }
    },
)  # fmt: skip
async def update_log_settings(request: Request) -> dict:
    """Triton's logging extension: change the settings given (with --allow-log-settings),
    the others kept; every setting after the change. Info, warning and error lines can
    each be turned off or on, and the debug lines on with a log_verbose_level above 0 (one
    verbose level: every debug line). The log stays JSON lines on standard error: log_file
    takes only '' and log_format only 'json'. An empty body changes nothing."""
    changes = _small_json(await request.body(), "a log settings request")
    if not isinstance(changes, dict):
        raise InvalidParameters(
            "a log settings request is empty or a JSON object of settings: "
            + ", ".join(LOG_SETTINGS)
        )
    return change_log_settings(request.app.state.settings, changes)


def change_log_settings(settings: Settings, changes: dict[str, Any]) -> dict[str, Any]:
    """The log settings after `changes` (REST and gRPC): all applied or none; no change is
    a read, which needs no --allow-log-settings. A change is logged, whatever the settings
    (a change that turns the warnings off is recorded too)."""
    if not changes:
        return log_switches.settings()
    if not settings.allow_log_settings:
        raise LogSettingsOff(
            "the log settings are read-only here: start the server with --allow-log-settings "
            "to change them"
        )
    before = log_switches.settings()
    try:
        after = log_switches.update(changes)
    except ValueError as exc:
        raise InvalidParameters(str(exc)) from exc
    changed = {name: value for name, value in after.items() if before[name] != value}
    log_always(log, "log settings changed", changed=changed)
    return after


_TRACE_SETTINGS_ERRORS = error_responses(V2ErrorResponse, {
    403: "trace_settings_off: a change asked of a server started without "
    "--allow-trace-settings",
    413: "payload_too_large: a body over 4096 bytes",
    422: "invalid_parameters: a body that is not a JSON object of the settings, each a "
    "string (or a list of one) this server takes, or null to clear it (every one refused "
    "is named; none is applied)",
})  # fmt: skip
_TRACE_SETTINGS_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {
                "trace_level": {
                    "type": ["array", "null"],
                    "items": {"type": "string", "enum": ["OFF", "TIMESTAMPS"]},
                    "minItems": 1,
                    "maxItems": 1,
                },
                "trace_rate": {
                    "type": ["string", "null"], "pattern": tracing.SETTING_PATTERNS["trace_rate"],
                },
                "trace_count": {
                    "type": ["string", "null"], "pattern": tracing.SETTING_PATTERNS["trace_count"],
                },
                "log_frequency": {"type": ["string", "null"], "enum": ["0", None]},
                "trace_file": {"type": ["string", "null"], "enum": ["", None]},
                "trace_mode": {"type": ["string", "null"], "enum": ["opentelemetry", None]},
            },
            "additionalProperties": False,
        }}},
    }
}  # fmt: skip


@router.get("/trace/setting", response_model=V2TraceSettings)
async def get_trace_settings(pool: Pool) -> dict:
    """Triton's trace extension: the server's trace settings (--trace-endpoint: whether
    inference requests are traced, one in how many, how many more)."""
    return pool.tracing.settings()


@router.post(
    "/trace/setting",
    response_model=V2TraceSettings,
    responses=_TRACE_SETTINGS_ERRORS,
    openapi_extra=_TRACE_SETTINGS_BODY,
)
async def update_trace_settings(request: Request, pool: Pool) -> dict:
    """Triton's trace extension: change the server's settings given (with
    --allow-trace-settings), the others kept; null restores one's value at start. Every
    setting after the change; an empty body changes nothing."""
    changes = await _trace_changes(request)
    return change_trace_settings(pool, None, changes)


@router.get(
    "/models/{model}/trace/setting", response_model=V2TraceSettings, responses=_MODEL_ERRORS
)
async def get_model_trace_settings(pool: Pool, model: str) -> dict:
    """Triton's trace extension: the trace settings in force for the model (its own where
    set, the server's for the rest)."""
    return change_trace_settings(pool, model, {})


@router.post(
    "/models/{model}/trace/setting",
    response_model=V2TraceSettings,
    responses={**_MODEL_ERRORS, **_TRACE_SETTINGS_ERRORS},
    openapi_extra=_TRACE_SETTINGS_BODY,
)
async def update_model_trace_settings(request: Request, pool: Pool, model: str) -> dict:
    """Triton's trace extension: change the model's own settings (with
    --allow-trace-settings); null clears one, the server's then in force."""
    changes = await _trace_changes(request)
    return change_trace_settings(pool, model, changes)


async def _trace_changes(request: Request) -> dict[str, Any]:
    changes = _small_json(await request.body(), "a trace settings request")
    if not isinstance(changes, dict):
        raise InvalidParameters(
            "a trace settings request is empty or a JSON object of settings: "
            + ", ".join((*tracing.CHANGEABLE, *tracing.READ_ONLY))
        )
    return changes


def change_trace_settings(
    pool: ModelPool, model: str | None, changes: dict[str, Any]
) -> dict[str, Any]:
    """The trace settings of `model` (the server's where None) after `changes` (REST and
    gRPC): all applied or none; no change is a read. A model is one served here."""
    if model is not None:
        find_model(pool, model, None)
    return pool.tracing.update(changes, model)


# Before /models/{model}: Triton's path for every model's statistics (a model named
# "stats" has its own at /models/stats/stats).
@router.get("/models/stats", response_model=V2StatisticsResponse)
async def every_models_statistics(pool: Pool) -> dict:
    """Every loaded model's statistics (Triton's statistics extension; docs/kserve-v2.md)."""
    return statistics(pool, "", None)


@router.get("/models/{model}/stats", response_model=V2StatisticsResponse, responses=_MODEL_ERRORS)
@router.get(
    "/models/{model}/versions/{version}/stats",
    response_model=V2StatisticsResponse,
    responses=_MODEL_ERRORS,
)
async def model_statistics(pool: Pool, model: str, version: str | None = None) -> dict:
    """The model's statistics (Triton's statistics extension; docs/kserve-v2.md)."""
    return statistics(pool, model, version)


@router.get("/models/{model}", response_model=V2ModelMetadata, responses=_MODEL_ERRORS)
@router.get(
    "/models/{model}/versions/{version}", response_model=V2ModelMetadata, responses=_MODEL_ERRORS
)
async def model_metadata(pool: Pool, model: str, version: str | None = None) -> dict:
    """The model's name, versions, platform and its tensors (batch axis -1, except a
    detect model's: one image, one row per detection)."""
    runner = find_model(pool, model, version)
    tensors = runner.pipeline.tensors
    return {
        "name": model,
        "versions": [MODEL_VERSION],
        "platform": _PLATFORMS[runner.settings.engine][0],
        "inputs": [_metadata(t) for t in tensors.inputs],
        "outputs": [_metadata(t) for t in tensors.outputs],
    }


@router.get("/models/{model}/ready", response_model=V2ModelReady, responses=_READY_ERRORS)
@router.get(
    "/models/{model}/versions/{version}/ready",
    response_model=V2ModelReady,
    responses=_READY_ERRORS,
)
async def model_ready(pool: Pool, model: str, version: str | None = None) -> JSONResponse:
    """200 once the model (and every other) is loaded and warmed up, else 503."""
    find_model(pool, model, version)
    body = {"name": model, "ready": pool.ready}
    if pool.ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/models/{model}/config", responses=_MODEL_ERRORS)
@router.get("/models/{model}/versions/{version}/config", responses=_MODEL_ERRORS)
async def model_config(pool: Pool, model: str, version: str | None = None) -> dict:
    """The fields of Triton's model configuration its clients and tools read."""
    runner = find_model(pool, model, version)
    tensors, settings = runner.pipeline.tensors, runner.settings
    platform, backend = _PLATFORMS[settings.engine]
    batched = tensors.batched
    inputs = []
    if tensors.image is not None:
        inputs.append(
            _config(
                tensors.image,
                batched=batched,
                format="FORMAT_NHWC",
                optional=tensors.encoded is not None,
            )
        )
    if tensors.encoded is not None:
        inputs.append(_config(tensors.encoded, batched=batched, optional=tensors.image is not None))
    config = {
        "name": model,
        "platform": platform,
        "backend": backend,
        "max_batch_size": settings.max_batch_size if batched else 0,
        "input": inputs,
        "output": [_config(t, batched=batched) for t in tensors.outputs],
        "instance_group": [
            {
                "count": settings.instances,
                "kind": f"KIND_{settings.device.upper().replace('CUDA', 'GPU')}",
            }
        ],
    }
    if batched:
        levels = settings.priority_levels
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(settings.max_delay_ms * 1000),
            # Triton's: each priority level holds the default queue policy's size
            "default_queue_policy": {"max_queue_size": settings.max_queue_size},
        }
        if levels > 1:
            config["dynamic_batching"]["priority_levels"] = levels
            config["dynamic_batching"]["default_priority_level"] = settings.default_level
    return config


# JSON past this is parsed in a thread: the parser holds the interpreter lock while it
# builds each element's object, but numpy's conversion of them lets the loop in between
# (a 9 MB body: the loop's longest wait 0.12 s in a thread, 0.23 s inline).
JSON_INLINE_BYTES = 256 * 1024

_INFER_ROUTE = {
    "response_model": V2InferResponse,
    "responses": {200: _INFER_OK, **_INFER_ERRORS},
    "openapi_extra": _INFER_BODY,
}


@router.post("/models/{model}/infer", **_INFER_ROUTE)
@router.post("/models/{model}/versions/{version}/infer", **_INFER_ROUTE)
async def infer(request: Request, pool: Pool, model: str, version: str | None = None) -> Response:
    """Inference on a batch of images given as one input tensor (one encoded image for a
    detect model); see docs/kserve-v2.md."""
    runner = find_model(pool, model, version)
    pool.require_ready()
    times = RequestTimes()
    route = _INFER_PATH if version is None else _VERSION_INFER_PATH
    span = functools.partial(tracing.http_span, route, request.url.path)
    traced = pool.tracing.request(runner.name, times, span)
    with traced, runner.in_use():  # an unload or reload answers this request first
        return await _infer(request, pool, runner, model, times)


_INFER_PATH = "/v2/models/{model}/infer"
_VERSION_INFER_PATH = "/v2/models/{model}/versions/{version}/infer"


async def _infer(
    request: Request, pool: ModelPool, runner: ModelRunner, model: str, times: RequestTimes
) -> Response:
    deadline = request_deadline(request)
    body = await request.body()
    header_length = request.headers.get(kserve.HEADER_LENGTH)
    parse = functools.partial(
        kserve.parse_infer_request, body, header_length, pool.settings.max_listed_elements
    )
    if kserve.json_length(body, header_length) > JSON_INLINE_BYTES:  # beside the event loop
        parsed, tensors = await asyncio.to_thread(parse)
    else:
        parsed, tensors = parse()
    gone = request.is_disconnected
    outputs = await infer_outputs(
        pool, runner, parsed, tensors, deadline=deadline, is_gone=gone, times=times
    )
    content, header_length = kserve.encode_response(model, MODEL_VERSION, parsed.id, outputs)
    timing = {SERVER_TIMING: times.server_timing()}
    if header_length is None:
        return Response(content, media_type="application/json", headers=timing)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={kserve.HEADER_LENGTH: str(header_length), **timing},
    )


async def infer_outputs(
    pool: ModelPool,
    runner: ModelRunner,
    parsed: kserve.InferRequest,
    tensors: list[Tensor],
    *,
    deadline: float,
    is_gone: IsGone | None,
    times: RequestTimes | None = None,
) -> list[OutputTensor]:
    """A parsed inference request answered: its inputs through the model's pipeline and
    batcher, the outputs it asks for (REST and gRPC alike), timed in the model's
    statistics (and in `times`, where given)."""
    deadline = _client_deadline(parsed, deadline)
    with runner.statistics.request(times) as times:
        with times.measure("compute_input"):
            options = _answer_options(parsed)
            level = _priority_level(runner, parsed)
            prepared = await _prepare(
                runner, tensors, pool.settings.max_images_per_request, times, deadline, is_gone
            )
        results = await runner.infer(
            prepared, deadline=deadline, is_gone=is_gone, times=times, level=level
        )
        with times.measure("compute_output"):
            pipeline = runner.pipeline
            if pipeline.answers_per_image(prepared):  # a mask each: in turns, as /segment
                answers = await runner.answers(
                    prepared, results, options, deadline=deadline, is_gone=is_gone
                )
                answer = pipeline.arrays_of(answers)
            else:
                answer = await asyncio.to_thread(pipeline.output_arrays, prepared, results, options)
            return _outputs(runner, parsed, answer)


def _answer_options(parsed: kserve.InferRequest) -> AnswerOptions:
    """The request parameters the answer reads: a detect model's `score_threshold`, the
    lowest score kept (as /detect's query parameter)."""
    if SCORE_THRESHOLD not in parsed.parameters:
        return AnswerOptions()
    threshold = parsed.parameters[SCORE_THRESHOLD]
    is_number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if not (is_number and 0 <= threshold <= 1):
        raise InvalidInferRequest(
            f"parameters.{SCORE_THRESHOLD} takes a number in 0..1; got {threshold!r}"
        )
    return AnswerOptions(score_threshold=float(threshold))


def _client_deadline(parsed: kserve.InferRequest, deadline: float) -> float:
    """`deadline`, or the request's `timeout` parameter (Triton's, in microseconds:
    tritonclient's `infer(..., timeout=N)`) from now where that is sooner; 0 or none:
    `deadline`."""
    timeout = parsed.parameters.get(TIMEOUT, 0)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout <= UINT64_MAX:
        raise InvalidInferRequest(
            f"parameters.{TIMEOUT} takes a whole number of microseconds up to 2**64 - 1 (0: "
            f"the server's --request-timeout-s); got {timeout!r}"
        )
    return min(deadline, time.monotonic() + timeout / 1e6) if timeout else deadline


def _priority_level(runner: ModelRunner, parsed: kserve.InferRequest) -> int:
    """The level the request's `priority` parameter (Triton's; tritonclient's `infer(...,
    priority=N)`) asks for: 1 the highest, 0 or none the model's default."""
    try:
        return runner.priority_level(parsed.parameters.get(PRIORITY, 0))
    except InvalidPriority as exc:
        raise InvalidInferRequest(f"parameters.{PRIORITY}: {exc.detail}") from exc


async def _prepare(
    runner: ModelRunner,
    tensors: list[Tensor],
    max_images: int,
    times: RequestTimes | None,
    deadline: float,
    is_gone: IsGone | None,
) -> list[Prepared]:
    """The request's one input as the pipeline's items: encoded images decoded and
    preprocessed as the image routes' uploads, an image tensor by the pipeline."""
    declared = runner.pipeline.tensors
    expected = [t.name for t in declared.inputs]
    if len(tensors) != 1 or tensors[0].name not in expected:
        raise InvalidInferRequest(
            f"send exactly one input, one of {expected}; got {[t.name for t in tensors]}"
        )
    (tensor,) = tensors
    count = tensor.array.shape[0] if tensor.array.ndim else 0
    if count == 0:
        raise InvalidInferRequest(
            f"input {tensor.name!r} holds no images (shape {tensor.array.shape})"
        )
    if not declared.batched and count != 1:
        raise InvalidInferRequest(
            f"model {runner.name!r} takes one image per request ({tensor.name!r} of shape "
            f"[1] or [1, 1]); got {count}: the detections of several images form no one "
            "tensor, so send a request per image"
        )
    if count > max_images:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {max_images}")
    if declared.encoded is not None and tensor.name == declared.encoded.name:
        return await runner.prepare(
            _encoded_images(tensor), times, deadline=deadline, is_gone=is_gone
        )
    return runner.pipeline.prepare_tensor(tensor)


def _encoded_images(tensor: Tensor) -> list[bytes]:
    if (
        tensor.datatype != BYTES
        or tensor.array.ndim not in (1, 2)
        or (tensor.array.ndim == 2 and tensor.array.shape[1] != 1)
    ):
        raise InvalidInferRequest(
            f"input {tensor.name!r} must be BYTES of shape [N] or [N, 1], one encoded image "
            f"per element; got {tensor.datatype} {list(tensor.array.shape)}"
        )
    elements = list(tensor.array.reshape(-1))
    if tensor.binary:
        return elements
    try:
        return [base64.b64decode(e, validate=True) for e in elements]
    except binascii.Error as exc:
        raise InvalidInferRequest(
            f"input {tensor.name!r} as JSON data takes base64 strings of the encoded images"
        ) from exc


def _outputs(
    runner: ModelRunner, parsed: kserve.InferRequest, answer: TensorOutputs
) -> list[OutputTensor]:
    """The outputs the request names (all when it names none), as binary data or JSON, or
    as the classification extension's top classes."""
    values = answer.arrays
    datatypes = {t.name: t.datatype for t in runner.pipeline.tensors.outputs}
    binary_default = bool(parsed.parameters.get("binary_data_output", False))
    requested = parsed.outputs or [kserve.RequestOutput(name=name) for name in values]
    unknown = [r.name for r in requested if r.name not in values]
    if unknown:
        raise InvalidInferRequest(
            f"unknown outputs {unknown}; for this request's input the model answers {list(values)}"
        )
    tensors = []
    for output in requested:
        binary = bool(output.parameters.get("binary_data", binary_default))
        top_k = output.parameters.get("classification")
        array = values[output.name]
        parameters = answer.parameters.get(output.name, {})
        if top_k is None:
            datatype = datatypes[output.name]
            tensors.append(OutputTensor(output.name, datatype, array, binary, parameters))
        else:
            classes = _classification(runner, array, top_k, output.name)
            tensors.append(OutputTensor(output.name, BYTES, classes, binary))
    return tensors


def _classification(runner: ModelRunner, array: np.ndarray, top_k: Any, name: str) -> np.ndarray:
    """Triton's classification extension: "value:index:label" strings, best first."""
    labels = runner.manifest.labels
    if (
        runner.manifest.task != "classify"
        or array.ndim != 2
        or not isinstance(top_k, int)
        or top_k < 1
    ):
        raise InvalidInferRequest(
            f"output {name!r}: parameters.classification takes a positive class count "
            "on a classification model's output"
        )
    k = min(top_k, array.shape[1])
    order = np.argsort(-array, axis=1, kind="stable")[:, :k]
    classes = np.empty(order.shape, dtype=object)
    for row, indices in enumerate(order):
        for column, index in enumerate(indices):
            classes[row, column] = f"{array[row, index]:f}:{index}:{labels[index]}".encode()
    return classes
