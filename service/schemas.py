"""Request and response bodies of every route (the OpenAPI at /docs is built from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="stable machine-readable code, e.g. 'payload_too_large'")
    detail: object = Field(None, description="what was wrong and how to fix it")
    request_id: str | None = Field(None, description="on a 5xx: the X-Request-ID to quote")


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
    max_queue_size: int
    instances: int


class ModelInfo(BaseModel):
    name: str
    task: Literal["classify", "segment", "detect"]
    variant: str
    input_size: tuple[int, int]
    labels: int
    engine: str
    batching: BatchSettings
    demo: bool
    ready: bool


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: Literal["ok", "ready", "not_ready", "draining"]
    detail: str = ""
