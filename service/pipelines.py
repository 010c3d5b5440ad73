"""What each task does around the engine: prepare items, run a batch, shape the answer.

A pipeline turns one decoded image into the items the batcher queues (one crop for
classification, the sliding-window tiles for segmentation, the whole image for
detection), runs a batch of items through one engine instance, and turns an image's
item results into its answer. Only `run_batch` touches the engine; it runs in the
engine's worker thread, the rest in the request's thread-pool call.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from service import imaging
from service.engines import InferenceEngine
from service.manifest import Manifest
from service.schemas import (
    RLE,
    ClassifyResult,
    ClassScore,
    Detection,
    DetectResult,
    SegmentClass,
    SegmentResult,
)


@dataclass
class Prepared:
    """One image made ready for the engine: its items and what finishing needs."""

    items: list[Any]
    width: int
    height: int
    context: Any = None


class Pipeline(Protocol):
    manifest: Manifest

    def prepare(self, image: Image.Image) -> Prepared: ...

    def run_batch(self, engine: InferenceEngine, items: list[Any]) -> list[Any]: ...

    def warmup_items(self) -> list[Any]: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Stable softmax in float64 over the last axis."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class _GraphIO:
    """The bundle's single image input and its outputs, by name."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.input_name = manifest.inputs[0].name
        self.output_names = [spec.name for spec in manifest.outputs]

    def _batch_input(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        batch = np.stack(items)
        if not self.manifest.preprocess.normalize_in_graph:
            batch = imaging.normalize_nchw(batch, self.manifest.preprocess)
        return {self.input_name: batch}


class ClassifyPipeline(_GraphIO):
    def prepare(self, image: Image.Image) -> Prepared:
        crop = imaging.classification_input(image, self.manifest.preprocess)
        return Prepared([crop], *image.size)

    def run_batch(self, engine: InferenceEngine, items: list[np.ndarray]) -> list[np.ndarray]:
        logits = engine.run(self._batch_input(items))[self.output_names[0]]
        return list(logits)

    def warmup_items(self) -> list[np.ndarray]:
        height, width = self.manifest.preprocess.input_size
        return [np.zeros((height, width, 3), dtype=np.uint8)]

    def finish(self, logits: np.ndarray, top_k: int) -> ClassifyResult:
        probabilities = softmax(logits)
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        labels = self.manifest.labels
        return ClassifyResult(
            top_k=[
                ClassScore(index=int(i), label=labels[i], score=float(probabilities[i]))
                for i in order
            ]
        )


@dataclass
class _SegmentContext:
    fitted: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]


class SegmentPipeline(_GraphIO):
    """mmseg slide inference; the tiles of one image may run in several batches."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        preprocess = manifest.preprocess
        if preprocess.sliding_window is None:
            height, width = preprocess.input_size
            self.window = imaging.SlidingWindow(crop=(height, width), stride=(height, width))
        else:
            self.window = preprocess.sliding_window

    def prepare(self, image: Image.Image) -> Prepared:
        preprocess = self.manifest.preprocess
        array = np.asarray(image, dtype=np.uint8)
        height, width = array.shape[:2]
        if preprocess.scale is not None:
            fit_h, fit_w = imaging.fit_size(height, width, preprocess.scale)
            array = imaging.resize_linear_uint8(array, fit_h, fit_w, preprocess.resize_backend)
        boxes = list(imaging.window_boxes(array.shape[0], array.shape[1], self.window))
        tiles = [imaging.tile(array, box, self.window.crop) for box in boxes]
        return Prepared(tiles, width, height, _SegmentContext(array.shape[:2], boxes))

    def run_batch(self, engine: InferenceEngine, items: list[np.ndarray]) -> list[np.ndarray]:
        return list(engine.run(self._batch_input(items))[self.output_names[0]])

    def warmup_items(self) -> list[np.ndarray]:
        return [np.zeros((*self.window.crop, 3), dtype=np.uint8)]

    def finish(self, prepared: Prepared, tile_logits: list[np.ndarray]) -> SegmentResult:
        context: _SegmentContext = prepared.context
        channels = tile_logits[0].shape[0]
        summed = np.zeros((channels, *context.fitted), dtype=np.float32)
        count = np.zeros(context.fitted, dtype=np.float32)
        for (y1, y2, x1, x2), logits in zip(context.boxes, tile_logits, strict=True):
            summed[:, y1:y2, x1:x2] += logits[:, : y2 - y1, : x2 - x1]
            count[y1:y2, x1:x2] += 1
        summed /= count
        mask = imaging.resized_argmax(summed, prepared.height, prepared.width)
        return SegmentResult(
            width=prepared.width,
            height=prepared.height,
            mask_png=_mask_png(mask, channels),
            classes=self._present(mask),
        )

    def _present(self, mask: np.ndarray) -> list[SegmentClass]:
        counts = np.bincount(mask.ravel(), minlength=len(self.manifest.labels))
        total = mask.size
        return [
            SegmentClass(index=int(i), label=self.manifest.labels[i], fraction=counts[i] / total)
            for i in np.flatnonzero(counts)
        ]


def _mask_png(mask: np.ndarray, classes: int) -> str:
    if classes <= 256:
        image = Image.fromarray(mask.astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(mask.astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class DetectPipeline(_GraphIO):
    """Mask R-CNN graphs take one image per call; a batch is a loop over its images."""

    def prepare(self, image: Image.Image) -> Prepared:
        return Prepared([np.asarray(image, dtype=np.uint8)], *image.size)

    def run_batch(self, engine: InferenceEngine, items: list[np.ndarray]) -> list[dict]:
        return [engine.run({self.input_name: item}) for item in items]

    def warmup_items(self) -> list[np.ndarray]:
        height, width = self.manifest.preprocess.input_size
        return [np.zeros((height, width, 3), dtype=np.uint8)]

    def finish(self, prepared: Prepared, outputs: dict, score_threshold: float) -> DetectResult:
        from pycocotools import mask as coco_mask

        scores = np.asarray(outputs["scores"], dtype=np.float32).reshape(-1)
        keep = np.flatnonzero(scores >= score_threshold)
        boxes = np.asarray(outputs["boxes"], dtype=np.float32).reshape(-1, 4)[keep]
        labels = np.asarray(outputs["labels"]).reshape(-1)[keep]
        masks = outputs.get("masks")
        rles: list[RLE | None] = [None] * len(keep)
        if masks is not None and len(keep):
            binary = np.asarray(masks)[keep, 0] > 0.5
            encoded = coco_mask.encode(np.asfortranarray(binary.transpose(1, 2, 0), np.uint8))
            rles = [
                RLE(size=tuple(rle["size"]), counts=rle["counts"].decode("utf-8"))
                for rle in encoded
            ]
        names = self.manifest.labels
        detections = [
            Detection(
                box=tuple(float(v) for v in box),
                index=int(label),
                label=names[int(label)] if 0 <= int(label) < len(names) else str(int(label)),
                score=float(scores[k]),
                mask=rle,
            )
            for k, box, label, rle in zip(keep, boxes, labels, rles, strict=True)
        ]
        return DetectResult(width=prepared.width, height=prepared.height, detections=detections)


def pipeline_for(manifest: Manifest) -> ClassifyPipeline | SegmentPipeline | DetectPipeline:
    """The pipeline of the bundle's task."""
    kinds = {"classify": ClassifyPipeline, "segment": SegmentPipeline, "detect": DetectPipeline}
    return kinds[manifest.task](manifest)
