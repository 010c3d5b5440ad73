"""Request and response bodies of every route (the OpenAPI at /docs is built from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.logs import MAX_VERBOSE_LEVEL

# The largest priority or timeout a request can name: Triton's are unsigned 64-bit
# integers (its gRPC parameters' uint64_param), so a larger number is refused as it would be
# there, before it reaches float arithmetic that cannot hold it.
UINT64_MAX = 2**64 - 1

_REQUEST_ID = "5xx only: the request's X-Request-ID, to quote when reporting the failure"


class ErrorResponse(BaseModel):
    """Every error answer of the service's own routes (all but /v2)."""

    error: str = Field(
        description="stable machine-readable code, e.g. 'payload_too_large'",
        examples=["unknown_model"],
    )
    detail: object = Field(
        description="what was wrong and how to fix it: a message, or for "
        "'invalid_parameters' on a query parameter a list of {loc, msg, input}",
        examples=["no model named 'nope'; loaded: ['shapes_classify']"],
    )
    request_id: str | None = Field(None, description=_REQUEST_ID)


class V2ErrorResponse(BaseModel):
    """Every error answer under /v2: the Open Inference Protocol's one string."""

    error: str = Field(
        description="'CODE: what was wrong', the codes of ErrorResponse",
        examples=["unknown_model: no model named 'nope'; loaded: ['shapes_classify']"],
    )
    request_id: str | None = Field(None, description=_REQUEST_ID)


SERVER_TIMING_HEADER = {
    "Server-Timing": {
        "description": "where the request's time in the server went, in milliseconds (W3C "
        "Server Timing): compute_input (decoding and preprocessing), queue (waiting for a "
        "batch), compute_infer (the engine), compute_output (making the answer), as the "
        "model's statistics count them",
        "required": True,
        "schema": {"type": "string"},
    }
}

RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}


def error_responses(body: object, meanings: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: for each error status it answers, what it means there and
    the body it carries (`body`: ErrorResponse, V2ErrorResponse or a union); 503 also
    promises Retry-After."""
    return {
        status: {
            "model": body,
            "description": meaning,
            **({"headers": RETRY_AFTER} if status == 503 else {}),
        }
        for status, meaning in meanings.items()
    }


class ClassScore(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResult(BaseModel):
    top_k: list[ClassScore]


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassifyResult] = Field(description="one per uploaded image, upload order")


class SegmentClass(BaseModel):
    index: int
    label: str
    fraction: float = Field(description="fraction of the image's pixels with this class")


class SegmentResult(BaseModel):
    width: int
    height: int
    mask_png: str = Field(
        description="base64 PNG of the class-index mask at the input image's size "
        "(8-bit greyscale when fewer than 256 classes, else 16-bit)"
    )
    classes: list[SegmentClass]


class SegmentResponse(BaseModel):
    model: str
    results: list[SegmentResult]


class RLE(BaseModel):
    size: tuple[int, int] = Field(description="(height, width)")
    counts: str = Field(description="COCO compressed RLE (pycocotools.mask.encode)")


class Detection(BaseModel):
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in input pixels")
    index: int
    label: str
    score: float
    mask: RLE | None = None


class DetectResult(BaseModel):
    width: int
    height: int
    detections: list[Detection]


class DetectResponse(BaseModel):
    model: str
    results: list[DetectResult]


class BatchSettings(BaseModel):
    max_batch_size: int
    max_delay_ms: float
    close_early: bool
    max_queue_size: int
    instances: int
    # --solo-engine: one more engine over all the CPUs runs lone requests.
    solo_engine: bool = False


class ModelInfo(BaseModel):
    name: str
    task: Literal["classify", "segment", "detect"]
    variant: str
    input_size: tuple[int, int]
    labels: int
    engine: str
    # Copies of the weights the instances hold: 1 where they share them (--share-weights).
    weight_copies: int
    batching: BatchSettings
    demo: bool
    ready: bool


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: Literal["ok", "ready", "not_ready", "draining"]
    detail: str = ""


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2LogSettings(BaseModel):
    """Triton's log settings (its logging extension), as this server keeps them."""

    log_file: str = Field(description="always '': the log goes to standard error")
    log_info: bool = Field(description="whether info lines (the access log's) are written")
    log_warnings: bool = Field(description="whether warning lines are written")
    log_errors: bool = Field(description="whether error lines are written")
    log_verbose_level: int = Field(
        ge=0, le=MAX_VERBOSE_LEVEL, description="above 0: the debug lines are written too"
    )
    log_format: str = Field(description="always 'json': one JSON object per line")


class V2TraceSettings(BaseModel):
    """Triton's trace settings (its trace extension), as this server keeps them: strings,
    the level a list of one."""

    trace_level: list[Literal["OFF", "TIMESTAMPS"]] = Field(
        description="TIMESTAMPS: sampled inference requests are traced (with "
        "--trace-endpoint); OFF: none"
    )
    trace_rate: str = Field(
        description="one request in this many of those without a traceparent is traced"
    )
    trace_count: str = Field(description="how many more traces (-1: no limit)")
    log_frequency: str = Field(description="always '0': spans go to the collector in batches")
    trace_file: str = Field(description="always '': traces go to --trace-endpoint")
    trace_mode: str = Field(description="always 'opentelemetry'")


class V2ServerLive(BaseModel):
    live: bool


class V2ServerReady(BaseModel):
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(examples=["UINT8"])
    shape: list[int] = Field(description="-1 where any size is accepted")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2StatisticDuration(BaseModel):
    count: int
    ns: int = Field(description="cumulative duration in nanoseconds")


class V2InferStatistics(BaseModel):
    success: V2StatisticDuration
    fail: V2StatisticDuration
    queue: V2StatisticDuration
    compute_input: V2StatisticDuration
    compute_infer: V2StatisticDuration
    compute_output: V2StatisticDuration
    cache_hit: V2StatisticDuration
    cache_miss: V2StatisticDuration


class V2BatchStatistics(BaseModel):
    batch_size: int
    compute_input: V2StatisticDuration
    compute_infer: V2StatisticDuration
    compute_output: V2StatisticDuration


class V2ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="milliseconds since the epoch; 0 before any")
    inference_count: int
    execution_count: int
    inference_stats: V2InferStatistics
    batch_stats: list[V2BatchStatistics]


class V2StatisticsResponse(BaseModel):
    model_stats: list[V2ModelStatistics]


class V2ModelIndex(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE"]
    reason: str | None = Field(
        None,
        description="why a model is UNAVAILABLE; for a READY one, that it serves the "
        "version loaded before because a new one did not load, and why",
    )


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list | None = Field(None, description="row-major elements, unless sent as binary")
    parameters: dict[str, object] | None = Field(
        None,
        description="binary_data_size when the tensor's bytes follow the JSON header; a "
        "detect model's masks: the height and width of the image their RLE counts are at",
    )


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, echoed when it sent one")
    outputs: list[V2OutputTensor]
