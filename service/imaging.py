"""Image decoding and the evaluation transforms of the official pipelines.

Everything here is CPU work run off the event loop. The transforms reproduce, bit for
bit, what the model was evaluated with (timm/torchvision eval transform for
classification, mmseg's test pipeline for segmentation), because "same scores as the
official pipeline" is the service's first promise. The parameters come from the
bundle's `manifest.preprocess`, never from constants here.

Colour conversion follows PIL's `Image.convert("RGB")` (what torchvision/timm loaders
do), with one exception: 16-bit greyscale ('I;16*', 'I') which PIL would clip to 255
(nearly all white). Those are scaled to 8 bits as round(v / 257) (65535 -> 255), and
32-bit float 'F' images are clipped to 0..255 and rounded.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hornet_bundle import Preprocess, SlidingWindow
from service.errors import BadImage, PayloadTooLarge, UnsupportedMediaType

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"})
SUPPORTED_CONTENT_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "image/gif",
    }
)
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_LOGIT_CHUNK_ELEMENTS = 1 << 22
# Resized images up to this many model crops are resized whole (exact); see classification_input.
EXACT_RESIZE_CROPS = 64


def decode_image(data: bytes, max_pixels: int, max_aspect_ratio: float = 0.0) -> Image.Image:
    """Decode an upload to an upright RGB image, refusing bombs before decoding pixels:
    over `max_pixels`, or (when `max_aspect_ratio` is not 0) with a longer side over
    `max_aspect_ratio` times the shorter."""
    if not data:
        raise BadImage("empty upload: no image bytes received")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image refused before decoding: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(
            "not a recognised image; send JPEG, PNG, WebP, BMP, TIFF or GIF"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"undecodable image header: {exc}") from exc
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaType(
            f"image format {image.format} is not supported; "
            f"send one of {sorted(SUPPORTED_FORMATS - {'MPO'})}"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "(--max-pixels)"
        )
    if width == 0 or height == 0:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if max_aspect_ratio and max(width, height) > max_aspect_ratio * min(width, height):
        raise PayloadTooLarge(
            f"image is {width}x{height}, an aspect ratio of "
            f"{max(width, height) / min(width, height):.1f}; the limit is {max_aspect_ratio:g} "
            "(--max-aspect-ratio)"
        )
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"undecodable or truncated {image.format} image: {exc}") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as PIL's convert gives it, with 16-bit and float greyscale scaled (module doc)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image.convert("I"), dtype=np.int64)
        grey = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        grey = np.rint(np.clip(np.nan_to_num(values), 0, 255)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def classification_input(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """The uint8 HWC crop the classifier was evaluated on (timm/torchvision eval transform).

    shorter_side_center_crop: torchvision Resize(int(size / crop_pct)) then
    CenterCrop(size); direct: Resize((h, w)). Both with PIL's resampling.

    The resize-then-crop is done as written while the resized image stays within
    `EXACT_RESIZE_CROPS` crops (aspect ratios up to about 50:1 at 224 px): bit-identical to
    torchvision. Beyond that (a 40000x1 image would resize to 10 million pixels wide) only
    the crop's region is resampled, with PIL's `box`: the same filter, but PIL may then
    round its two passes in the other order, so pixels differ by rounding (under one
    grey level on average on noise, tests/service/test_bounded_work.py); the work stays
    one crop.
    """
    height, width = preprocess.input_size
    resample = _RESAMPLE[preprocess.interpolation]
    if preprocess.resize_mode == "direct":
        return np.asarray(image.resize((width, height), resample), dtype=np.uint8)
    if preprocess.resize_mode != "shorter_side_center_crop":
        raise ValueError(f"resize_mode {preprocess.resize_mode!r} is not a classification mode")
    crop_pct = preprocess.crop_pct or 1.0
    resized_w, resized_h = _shorter_side_size(image.size, height, width, crop_pct)
    small = resized_w * resized_h <= EXACT_RESIZE_CROPS * height * width
    if small or resized_w < width or resized_h < height:
        resized = image.resize((resized_w, resized_h), resample)
        return _center_crop(np.asarray(resized, dtype=np.uint8), height, width)
    return _crop_then_resize(image, (resized_w, resized_h), height, width, resample)


def _crop_then_resize(
    image: Image.Image,
    resized: tuple[int, int],
    height: int,
    width: int,
    resample: Image.Resampling,
) -> np.ndarray:
    """The center crop of `image.resize(resized)` computed over the crop's region only."""
    resized_w, resized_h = resized
    top = int(round((resized_h - height) / 2.0))
    left = int(round((resized_w - width) / 2.0))
    scale_x, scale_y = image.width / resized_w, image.height / resized_h
    box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
    return np.asarray(image.resize((width, height), resample, box=box), dtype=np.uint8)


def _shorter_side_size(
    size: tuple[int, int], height: int, width: int, crop_pct: float
) -> tuple[int, int]:
    """PIL (w, h) after timm's scale step: shorter side for square crops, else both sides."""
    if height != width:
        return math.floor(width / crop_pct), math.floor(height / crop_pct)
    target = math.floor(height / crop_pct)
    in_w, in_h = size
    if in_w <= in_h:
        return target, int(target * in_h / in_w)
    return int(target * in_w / in_h), target


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision CenterCrop: pad with zeros when smaller, then top = round((h - size) / 2)."""
    in_h, in_w = array.shape[:2]
    if in_h < height or in_w < width:
        pad_h, pad_w = max(height - in_h, 0), max(width - in_w, 0)
        array = np.pad(
            array,
            ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)),
        )
        in_h, in_w = array.shape[:2]
    top = int(round((in_h - height) / 2.0))
    left = int(round((in_w - width) / 2.0))
    return np.ascontiguousarray(array[top : top + height, left : left + width])


def normalize_nchw(batch: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """uint8 NHWC -> normalised float32 NCHW, for graphs with normalize_in_graph false."""
    values = batch.astype(np.float32)
    if preprocess.pixel_range == 1:
        values /= 255.0
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    return np.ascontiguousarray(((values - mean) / std).transpose(0, 3, 1, 2))


def fit_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv rescale_size(keep_ratio=True): the largest size fitting (long, short) scale.

    Each side is at least one pixel (mmcv would give 0 for a 40000x1 image and fail).
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def fit_image(image: Image.Image, scale: tuple[int, int], backend: str) -> np.ndarray:
    """The uint8 HWC image resized to fit `scale` (mmcv imrescale), as the model's
    pipeline resized it: work and memory are those of the fitted image plus one decode."""
    fit_h, fit_w = fit_size(image.height, image.width, scale)
    if backend == "pil":
        resized = image.resize((fit_w, fit_h), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8)
    return resize_linear_uint8(np.asarray(image, dtype=np.uint8), fit_h, fit_w, backend)


def resize_linear_uint8(array: np.ndarray, height: int, width: int, backend: str) -> np.ndarray:
    """Bilinear resize of an HWC uint8 image as the dense pipelines did it: 'opencv' is
    cv2.INTER_LINEAR (mmcv's imresize, no antialiasing), 'pil' is PIL's bilinear."""
    if backend == "pil":
        image = Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


def _linear_taps(
    in_size: int, out_size: int, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of half-pixel bilinear (align_corners False) for output
    positions start..stop of a resize from in_size to out_size."""
    scale = in_size / out_size
    positions = np.arange(start, out_size if stop is None else stop, dtype=np.float64)
    source = np.maximum((positions + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low).astype(np.float32)


def resize_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """CHW float bilinear resize as torch F.interpolate(mode='bilinear', align_corners=False)."""
    y0, y1, wy = _linear_taps(values.shape[1], height)
    x0, x1, wx = _linear_taps(values.shape[2], width)
    rows = values[:, y0] * (1 - wy)[None, :, None] + values[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def resized_window(
    values: np.ndarray, size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
) -> np.ndarray:
    """Rows y0..y1 and columns x0..x1 of the HW float map `values` bilinearly resized to
    `size` (as resize_bilinear), computed for that window only."""
    y0, y1, wy = _linear_taps(values.shape[0], size[0], *rows)
    x0, x1, wx = _linear_taps(values.shape[1], size[1], *cols)
    picked = values[y0] * (1 - wy)[:, None] + values[y1] * wy[:, None]
    return picked[:, x0] * (1 - wx) + picked[:, x1] * wx


def resized_argmax(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """argmax over classes of CHW logits resized to (height, width), in bounded memory:
    uint8 class indices (uint16 beyond 256 classes). Columns are resized once (as
    F.interpolate, which also interpolates along x first); rows a band at a time."""
    channels, in_h, in_w = logits.shape
    x0, x1, wx = _linear_taps(in_w, width)
    columns = logits[:, :, x0] * (1 - wx) + logits[:, :, x1] * wx
    y0, y1, wy = _linear_taps(in_h, height)
    rows_per_band = max(1, _LOGIT_CHUNK_ELEMENTS // max(1, channels * width))
    mask = np.empty((height, width), dtype=np.uint8 if channels <= 256 else np.uint16)
    for start in range(0, height, rows_per_band):
        stop = min(start + rows_per_band, height)
        w = wy[start:stop][None, :, None]
        band = columns[:, y0[start:stop]] * (1 - w) + columns[:, y1[start:stop]] * w
        mask[start:stop] = band.argmax(axis=0)
    return mask


def class_counts(mask: np.ndarray, classes: int) -> np.ndarray:
    """Pixels per class of a class-index mask, counted a band at a time (np.bincount of
    the whole mask would first copy it to int64: 8 bytes per pixel)."""
    counts = np.zeros(classes, dtype=np.int64)
    rows_per_band = max(1, _LOGIT_CHUNK_ELEMENTS // max(1, mask.shape[1]))
    for start in range(0, mask.shape[0], rows_per_band):
        counts += np.bincount(mask[start : start + rows_per_band].ravel(), minlength=classes)
    return counts


def window_boxes(
    height: int, width: int, window: SlidingWindow
) -> Iterator[tuple[int, int, int, int]]:
    """mmseg slide_inference windows (y1, y2, x1, x2); border windows shifted back inside."""
    crop_h, crop_w = window.crop
    stride_h, stride_w = window.stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    for row in range(rows):
        for col in range(cols):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(col * stride_w + crop_w, width)
            yield max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2


def tile(array: np.ndarray, box: tuple[int, int, int, int], crop: tuple[int, int]) -> np.ndarray:
    """One window of an HWC image, zero-padded bottom/right to the graph's fixed crop."""
    y1, y2, x1, x2 = box
    piece = array[y1:y2, x1:x2]
    pad_h, pad_w = crop[0] - piece.shape[0], crop[1] - piece.shape[1]
    if pad_h or pad_w:
        piece = np.pad(piece, ((0, pad_h), (0, pad_w), (0, 0)))
    return np.ascontiguousarray(piece)
