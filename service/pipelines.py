"""What each task does around the engine: prepare items, run a batch, shape the answer.

A pipeline turns one decoded image into the items the batcher queues (one crop for
classification, the sliding-window tiles for segmentation, the whole image for
detection), runs a batch of items through one engine instance, and turns an image's
item results into its answer. Only `run_batch` touches the engine; it runs in the
engine's worker thread, the rest in the request's thread-pool call.

The same pipeline serves the tensor protocol (`/v2`): it declares the tensors it takes
and answers, turns a request's image tensor into the same items, and its engine results
into output arrays (a detector: its finished answer, as tensors); the protocol's parsing
and encoding stay in `service.kserve` and its router.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from hornet_bundle import DEFAULT_SCORE_THRESHOLD, Manifest
from service import imaging
from service.engines import InferenceEngine
from service.kserve import BYTES, InvalidInferRequest, Tensor
from service.schemas import (
    RLE,
    ClassifyResult,
    ClassScore,
    Detection,
    DetectResult,
    SegmentClass,
    SegmentResult,
)

ENCODED_IMAGE = "encoded_image"
PROBABILITIES = "probabilities"
LABEL_NAMES = "label_names"
MASK_PNG = "mask_png"
CLASS_FRACTIONS = "class_fractions"

Answer = ClassifyResult | SegmentResult | DetectResult


@dataclass
class Prepared:
    """One image made ready for the engine: its items and what finishing needs."""

    items: list[Any]
    width: int
    height: int
    context: Any = None
    # --response-cache-mib: the upload's digest, and its results when it was cached (the
    # items are then empty: nothing to run)
    digest: bytes | None = None
    cached: list[Any] | None = None


@dataclass(frozen=True)
class AnswerOptions:
    """What a request asks of its answers; each task reads the options that concern it."""

    top_k: int = 5  # classes per image (classify)
    score_threshold: float = DEFAULT_SCORE_THRESHOLD  # the lowest detection score kept (detect)


@dataclass(frozen=True)
class ServedTensor:
    """A tensor as the Open Inference Protocol names it: its datatype is the protocol's
    (UINT8, FP32, BYTES...), -1 in its shape a free axis."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class TensorInterface:
    """What a pipeline takes and answers as tensors: the graph's own image tensor (when
    it takes one), the encoded images it decodes itself (when it takes them), and its
    outputs, all with the batch axis first when `batched`. An unbatched interface answers
    one image per request (a detector: as many rows as it finds objects)."""

    image: ServedTensor | None
    encoded: ServedTensor | None
    outputs: list[ServedTensor]
    batched: bool = True

    @property
    def inputs(self) -> list[ServedTensor]:
        return [t for t in (self.image, self.encoded) if t is not None]


@dataclass
class TensorOutputs:
    """A tensor request's answer: each output's array, and the protocol parameters some
    outputs carry (a detector's masks: the image size their RLE counts are at)."""

    arrays: dict[str, np.ndarray]
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)


class Pipeline(Protocol):
    manifest: Manifest
    # Whether `run_batch` gives the engine its items as one batch (else one at a time).
    batched: bool

    @property
    def tensors(self) -> TensorInterface: ...

    def first_resize(self, width: int, height: int) -> tuple[int, int] | None:
        """The (width, height) `prepare` first resizes an upload of this size to, or None
        where it takes the image at its own size: how far a decode may reduce it."""
        ...

    def prepare(self, decoded: imaging.Decoded) -> Prepared: ...

    def prepare_tensor(self, tensor: Tensor) -> list[Prepared]: ...

    def run_batch(self, engine: InferenceEngine, items: list[Any]) -> list[Any]: ...

    def warmup_items(self) -> list[Any]: ...

    def finish(self, prepared: Prepared, results: list[Any], options: AnswerOptions) -> Answer: ...

    def finish_is_light(self, options: AnswerOptions) -> bool:
        """Whether `finish` is light enough (well under a millisecond) to run on the event
        loop: a thread hand-off would cost more than the work."""
        ...

    def output_arrays(
        self, prepared: list[Prepared], results: list[list[Any]], options: AnswerOptions
    ) -> TensorOutputs: ...

    def answers_per_image(self, prepared: list[Prepared]) -> bool:
        """Whether `output_arrays` would make each image's answer with `finish` (a
        segmenter's encoded images): the caller may then make them itself, in turns, and
        have `arrays_of` put them in the output tensors."""
        ...

    def arrays_of(self, answers: list[Answer]) -> TensorOutputs:
        """The output tensors of the answers `finish` made, where `answers_per_image`."""
        ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Stable softmax in float64 over the last axis."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class _GraphIO:
    """The bundle's single image input and its outputs, by name, and as tensors."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.input_name = manifest.inputs[0].name
        self.output_names = [spec.name for spec in manifest.outputs]

    def finish_is_light(self, options: AnswerOptions) -> bool:
        return False

    def answers_per_image(self, prepared: list[Prepared]) -> bool:
        return False

    def arrays_of(self, answers: list[Any]) -> TensorOutputs:
        raise NotImplementedError(f"{type(self).__name__} makes its output arrays whole")

    def _image_tensor(self, height: int, width: int) -> ServedTensor:
        """The graph's image input as the host hands it over: RGB pixels, NHWC."""
        return ServedTensor(self.input_name, "UINT8", [-1, height, width, 3])

    def prepare_tensor(self, tensor: Tensor) -> list[Prepared]:
        """One image per row of the image tensor, whose rows are already at the graph's
        input size: uint8 as they are, float32 (on the 0..255 scale) rounded. The graph,
        or `_batch_input`, normalises them as it does the crops `prepare` makes."""
        image = self.tensors.image
        if list(tensor.array.shape[1:]) != image.shape[1:]:
            raise InvalidInferRequest(
                f"input {image.name!r} must have shape "
                f"[N, {', '.join(map(str, image.shape[1:]))}] "
                f"(NHWC RGB at the model's input size); got {list(tensor.array.shape)}"
            )
        if tensor.datatype == "UINT8":
            pixels = tensor.array
        elif tensor.datatype == "FP32":
            values = tensor.array
            if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 255:
                raise InvalidInferRequest(
                    f"input {image.name!r} as FP32 takes pixel values in 0..255 (the graph "
                    "normalises them itself); got values outside that range"
                )
            pixels = np.rint(values).astype(np.uint8)
        else:
            raise InvalidInferRequest(
                f"input {image.name!r} must be UINT8 (or FP32 on the 0..255 scale), not "
                f"{tensor.datatype}"
            )
        height, width = image.shape[1:3]
        return [Prepared([np.ascontiguousarray(row)], width, height) for row in pixels]

    def output_arrays(
        self, prepared: list[Prepared], results: list[list[Any]], options: AnswerOptions
    ) -> TensorOutputs:
        """The graph's output for the images of a tensor request (one item each), as one
        batch."""
        rows = [np.asarray(items[0], dtype=np.float32) for items in results]
        return TensorOutputs({self.output_names[0]: np.stack(rows)})

    def _batch_input(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        batch = np.stack(items)
        if not self.manifest.preprocess.normalize_in_graph:
            batch = imaging.normalize_nchw(batch, self.manifest.preprocess)
        return {self.input_name: batch}


# Classification answers of up to LIGHT_TOP_K classes of a head of up to LIGHT_CLASSES are
# finished on the event loop (a softmax and a sort of 1000 scores: under 0.1 ms).
LIGHT_TOP_K = 100
LIGHT_CLASSES = 1000


class ClassifyPipeline(_GraphIO):
    batched = True

    @property
    def tensors(self) -> TensorInterface:
        """Crops at the input size, or encoded images preprocessed as `prepare` does;
        the graph's logits and their softmax."""
        height, width = self.manifest.preprocess.input_size
        classes = [-1, len(self.manifest.labels)]
        return TensorInterface(
            self._image_tensor(height, width),
            ServedTensor(ENCODED_IMAGE, BYTES, [-1, 1]),
            [
                ServedTensor(self.output_names[0], "FP32", classes),
                ServedTensor(PROBABILITIES, "FP32", classes),
            ],
        )

    def first_resize(self, width: int, height: int) -> tuple[int, int] | None:
        return imaging.first_resize(self.manifest.preprocess, width, height)

    def prepare(self, decoded: imaging.Decoded) -> Prepared:
        crop = imaging.classification_input(decoded.image, self.manifest.preprocess, decoded.size)
        return Prepared([crop], *decoded.size)

    def run_batch(self, engine: InferenceEngine, items: list[np.ndarray]) -> list[np.ndarray]:
        logits = engine.run(self._batch_input(items))[self.output_names[0]]
        return list(logits)

    def warmup_items(self) -> list[np.ndarray]:
        height, width = self.manifest.preprocess.input_size
        return [np.zeros((height, width, 3), dtype=np.uint8)]

    def output_arrays(
        self, prepared: list[Prepared], results: list[list[np.ndarray]], options: AnswerOptions
    ) -> TensorOutputs:
        outputs = super().output_arrays(prepared, results, options)
        logits = outputs.arrays[self.output_names[0]]
        outputs.arrays[PROBABILITIES] = softmax(logits).astype(np.float32)
        return outputs

    def finish_is_light(self, options: AnswerOptions) -> bool:
        return options.top_k <= LIGHT_TOP_K and len(self.manifest.labels) <= LIGHT_CLASSES

    def finish(
        self, prepared: Prepared, results: list[np.ndarray], options: AnswerOptions
    ) -> ClassifyResult:
        probabilities = softmax(results[0])
        order = np.argsort(-probabilities, kind="stable")[: options.top_k]
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


class _FittedInput(_GraphIO):
    """Segmenters and detectors: the upload resized to fit the manifest's `scale` (the
    size mmseg's and mmdet's test pipelines resize to), or as it is without one."""

    def first_resize(self, width: int, height: int) -> tuple[int, int] | None:
        return imaging.fitted_size(self.manifest.preprocess.scale, width, height)

    def _fitted(self, decoded: imaging.Decoded, backend: str) -> np.ndarray:
        scale = self.manifest.preprocess.scale
        if scale is None:
            return imaging.pixels(decoded.image)
        return imaging.fit_image(decoded.image, scale, backend, decoded.size)


class SegmentPipeline(_FittedInput):
    """mmseg slide inference; the tiles of one image may run in several batches."""

    batched = True

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        preprocess = manifest.preprocess
        if preprocess.sliding_window is None:
            height, width = preprocess.input_size
            self.window = imaging.SlidingWindow(crop=(height, width), stride=(height, width))
        else:
            self.window = preprocess.sliding_window

    @property
    def tensors(self) -> TensorInterface:
        """Either one sliding-window tile per row, answered with the graph's raw tile
        logits; or encoded images, each tiled, run and finished as `/segment` does an
        upload, answered with `/segment`'s mask (the base64 PNG of class indices at the
        image's size) and the fraction of its pixels in each class."""
        height, width = self.window.crop
        classes = len(self.manifest.labels)
        return TensorInterface(
            self._image_tensor(height, width),
            ServedTensor(ENCODED_IMAGE, BYTES, [-1, 1]),
            [
                ServedTensor(self.output_names[0], "FP32", [-1, classes, height, width]),
                ServedTensor(MASK_PNG, BYTES, [-1, 1]),
                ServedTensor(CLASS_FRACTIONS, "FP32", [-1, classes]),
            ],
        )

    def output_arrays(
        self, prepared: list[Prepared], results: list[list[Any]], options: AnswerOptions
    ) -> TensorOutputs:
        """Tiles (`prepare_tensor`, no context): their logits. Encoded images (`prepare`):
        each image's `/segment` answer as a row of `mask_png` and `class_fractions`."""
        if not self.answers_per_image(prepared):
            return super().output_arrays(prepared, results, options)
        pairs = zip(prepared, results, strict=True)
        return self.arrays_of([self.finish(p, r, options) for p, r in pairs])

    def answers_per_image(self, prepared: list[Prepared]) -> bool:
        return prepared[0].context is not None  # encoded images, not tiles

    def arrays_of(self, answers: list[SegmentResult]) -> TensorOutputs:
        fractions = np.zeros((len(answers), len(self.manifest.labels)), dtype=np.float32)
        for row, answer in enumerate(answers):
            for present in answer.classes:
                fractions[row, present.index] = present.fraction
        masks = np.array([[a.mask_png.encode()] for a in answers], dtype=object)
        return TensorOutputs({MASK_PNG: masks, CLASS_FRACTIONS: fractions})

    def prepare(self, decoded: imaging.Decoded) -> Prepared:
        array = self._fitted(decoded, self.manifest.preprocess.resize_backend)
        boxes = list(imaging.window_boxes(array.shape[0], array.shape[1], self.window))
        tiles = [imaging.tile(array, box, self.window.crop) for box in boxes]
        return Prepared(tiles, *decoded.size, _SegmentContext(array.shape[:2], boxes))

    def run_batch(self, engine: InferenceEngine, items: list[np.ndarray]) -> list[np.ndarray]:
        return list(engine.run(self._batch_input(items))[self.output_names[0]])

    def warmup_items(self) -> list[np.ndarray]:
        return [np.zeros((*self.window.crop, 3), dtype=np.uint8)]

    def finish(
        self, prepared: Prepared, results: list[np.ndarray], options: AnswerOptions
    ) -> SegmentResult:
        """The tiles' logits averaged where they overlap, argmax at the image's size."""
        mask = imaging.resized_argmax(
            self.averaged_logits(prepared, results), prepared.height, prepared.width
        )
        return SegmentResult(
            width=prepared.width,
            height=prepared.height,
            mask_png=_mask_png(mask),
            classes=self._present(mask),
        )

    @staticmethod
    def averaged_logits(prepared: Prepared, results: list[np.ndarray]) -> np.ndarray:
        """The tiles' logits (CHW each) averaged where they overlap, at the fitted size."""
        context: _SegmentContext = prepared.context
        channels = results[0].shape[0]
        summed = np.zeros((channels, *context.fitted), dtype=np.float32)
        count = np.zeros(context.fitted, dtype=np.float32)
        for (y1, y2, x1, x2), logits in zip(context.boxes, results, strict=True):
            summed[:, y1:y2, x1:x2] += logits[:, : y2 - y1, : x2 - x1]
            count[y1:y2, x1:x2] += 1
        summed /= count
        return summed

    def _present(self, mask: np.ndarray) -> list[SegmentClass]:
        counts = imaging.class_counts(mask, len(self.manifest.labels))
        total = mask.size
        return [
            SegmentClass(index=int(i), label=self.manifest.labels[i], fraction=counts[i] / total)
            for i in np.flatnonzero(counts)
        ]


def _mask_png(mask: np.ndarray) -> str:
    """Base64 PNG of a uint8 (8-bit greyscale) or uint16 (16-bit) class-index mask; zlib
    level 1: masks are long runs, so it compresses them about as well as the default
    level, several times faster."""
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class _DetectContext:
    """The size the engine saw; boxes and masks come back in its pixels."""

    fitted: tuple[int, int]


class DetectPipeline(_FittedInput):
    """Mask R-CNN graphs take one image per call; a batch is a loop over its images.

    With a `scale` in the manifest the host resizes the image to fit it (the size the
    detector's own transform, or mmdet's test pipeline, resizes to), so the engine's
    work and memory are those of the model's input whatever was uploaded; boxes are
    scaled back to the upload's pixels and each mask is made and RLE-encoded one
    detection at a time, within its box: an mmdet-layout graph's 28x28 map is pasted
    onto the upload as mmdet pastes it, a torchvision-layout graph's mask (pasted at the
    engine's size) is resized. Without a scale the engine gets the decoded image as it is.
    """

    batched = False

    def prepare(self, decoded: imaging.Decoded) -> Prepared:
        array = self._fitted(decoded, "opencv")
        return Prepared([array], *decoded.size, _DetectContext(array.shape[:2]))

    def run_batch(self, engine: InferenceEngine, items: list[np.ndarray]) -> list[dict]:
        return [engine.run({self.input_name: item}) for item in items]

    def warmup_items(self) -> list[np.ndarray]:
        height, width = self.manifest.preprocess.input_size
        return [np.zeros((height, width, 3), dtype=np.uint8)]

    @property
    def tensors(self) -> TensorInterface:
        """One encoded image per request, decoded and prepared as `prepare` does an upload,
        and its detections as `finish` makes them, one row each: boxes in the upload's
        pixels, scores, class indices and names, and each mask's COCO RLE counts. Unbatched:
        the detections of several images form no one tensor."""
        outputs = [
            ServedTensor("boxes", "FP32", [-1, 4]),
            ServedTensor("scores", "FP32", [-1]),
            ServedTensor("labels", "INT64", [-1]),
            ServedTensor(LABEL_NAMES, BYTES, [-1]),
        ]
        if "masks" in self.output_names:
            outputs.append(ServedTensor("masks", BYTES, [-1]))
        encoded = ServedTensor(ENCODED_IMAGE, BYTES, [1, 1])
        return TensorInterface(None, encoded, outputs, batched=False)

    def prepare_tensor(self, tensor: Tensor) -> list[Prepared]:
        """A detector takes encoded images only: its graph's input is the image as
        `prepare` fits it, which is the server's job."""
        raise InvalidInferRequest(
            f"input {tensor.name!r}: a detect model takes {ENCODED_IMAGE!r} only, one encoded "
            "image file"
        )

    def output_arrays(
        self, prepared: list[Prepared], results: list[list[dict]], options: AnswerOptions
    ) -> TensorOutputs:
        """The one image's answer as /detect gives it (`finish`), as tensors; the masks'
        RLE counts are at the image's size, which their parameters give."""
        (image,), (items,) = prepared, results
        detections = self.finish(image, items, options).detections
        arrays = {
            "boxes": np.array([d.box for d in detections], dtype=np.float32).reshape(-1, 4),
            "scores": np.array([d.score for d in detections], dtype=np.float32),
            "labels": np.array([d.index for d in detections], dtype=np.int64),
            LABEL_NAMES: np.array([d.label.encode() for d in detections], dtype=object),
        }
        if "masks" not in self.output_names:
            return TensorOutputs(arrays)
        arrays["masks"] = np.array([d.mask.counts.encode() for d in detections], dtype=object)
        size = {"height": image.height, "width": image.width}
        return TensorOutputs(arrays, {"masks": size})

    def finish(
        self, prepared: Prepared, results: list[dict], options: AnswerOptions
    ) -> DetectResult:
        (outputs,) = results
        scores = np.asarray(outputs["scores"], dtype=np.float32).reshape(-1)
        keep = np.flatnonzero(scores >= options.score_threshold)
        fitted_h, fitted_w = prepared.context.fitted
        to_upload = np.array(
            [prepared.width / fitted_w, prepared.height / fitted_h] * 2, dtype=np.float32
        )
        boxes = np.asarray(outputs["boxes"], dtype=np.float32).reshape(-1, 4)[keep] * to_upload
        labels = np.asarray(outputs["labels"]).reshape(-1)[keep]
        masks = outputs.get("masks")
        size = (prepared.height, prepared.width)
        names = self.manifest.labels
        detections = [
            Detection(
                box=tuple(float(v) for v in box),
                index=int(label),
                label=names[int(label)] if 0 <= int(label) < len(names) else str(int(label)),
                score=float(scores[k]),
                mask=None if masks is None else self._mask(masks[k], box, size),
            )
            for k, box, label in zip(keep, boxes, labels, strict=True)
        ]
        return DetectResult(width=prepared.width, height=prepared.height, detections=detections)

    def _mask(self, mask: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> RLE:
        """One detection's mask at the upload's size: a graph's (28, 28) map in the box
        is pasted as mmdet pastes it; a (1, h, w) map pasted at the engine's size is
        resized within the box."""
        if mask.ndim == 2:
            return _window_rle(*imaging.paste_mask_window(mask, box, size), size)
        return _mask_rle(mask[0], box, size)


def _mask_rle(probabilities: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> RLE:
    """COCO RLE of one detection's mask (probability > 0.5) at the upload's `size`.

    `probabilities` is the mask pasted at the engine's input size. At the upload's size
    it is resized bilinearly (as F.interpolate) and only the box, widened by two engine
    pixels for the paste's border, is computed: pasted masks are zero outside it. At the
    engine's own size the whole mask is taken as it is.
    """
    height, width = size
    if probabilities.shape == size:
        return _window_rle(np.asfortranarray(probabilities > 0.5), (0, height), (0, width), size)
    margin_y = 2 * height / probabilities.shape[0]
    margin_x = 2 * width / probabilities.shape[1]
    y0, y1 = _span(box[1] - margin_y, box[3] + margin_y, height)
    x0, x1 = _span(box[0] - margin_x, box[2] + margin_x, width)
    window = np.zeros((y1 - y0, x1 - x0), dtype=bool, order="F")
    if y1 > y0 and x1 > x0:
        window[:] = imaging.resized_window(probabilities, size, (y0, y1), (x0, x1)) > 0.5
    return _window_rle(window, (y0, y1), (x0, x1), size)


def _span(low: float, high: float, limit: int) -> tuple[int, int]:
    start = min(max(int(np.floor(low)), 0), limit)
    return start, min(max(int(np.ceil(high)), start), limit)


def _window_rle(
    window: np.ndarray, rows: tuple[int, int], columns: tuple[int, int], size: tuple[int, int]
) -> RLE:
    """COCO compressed RLE of an image of `size` that is zero outside `window` (0/1,
    column-major) at `rows` x `columns`, from the window alone: runs change where two
    window pixels that are neighbours in the image's column-major order differ, where a
    window column starts or ends on a 1 that zeros outside the window border, and at
    the window's first and last pixels."""
    from pycocotools import mask as coco_mask

    height, width = size
    (y0, y1), (x0, _) = rows, columns
    tall = y1 - y0
    flat = window.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # a 0/1 change before these
    ends = np.zeros(0, np.int64)  # 1s followed by zeros outside the window: change after
    if tall and tall < height:  # zeros lie between one column's end and the next's start
        changes = changes[changes % tall != 0]
        starts = np.arange(0, flat.size, tall)
        changes = np.concatenate([changes, starts[flat[starts] != 0]])
        ends = starts[flat[starts + tall - 1] != 0] + tall - 1
    elif flat.size:
        changes = np.concatenate([changes, np.flatnonzero(flat[:1])])
        ends = np.flatnonzero(flat[-1:]) + flat.size - 1

    def to_image(index: np.ndarray) -> np.ndarray:  # window column-major -> image's
        return (x0 + index // max(tall, 1)) * height + y0 + index % max(tall, 1)

    cuts = np.sort(np.concatenate([to_image(changes), to_image(ends) + 1]))
    cuts = cuts[cuts < height * width]
    runs = np.diff(np.concatenate(([0], cuts, [height * width]))).tolist()
    encoded = coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return RLE(size=(height, width), counts=encoded["counts"].decode("ascii"))


def pipeline_for(manifest: Manifest) -> ClassifyPipeline | SegmentPipeline | DetectPipeline:
    """The pipeline of the bundle's task."""
    kinds = {"classify": ClassifyPipeline, "segment": SegmentPipeline, "detect": DetectPipeline}
    return kinds[manifest.task](manifest)
