"""The image transforms a manifest's `preprocess` describes: the evaluation transforms
of the official pipelines, which the served graphs expect their input to have been through.

The service runs them on every request; the exporter's demo training runs its data
through them, so the demo models learn from what they are served. They reproduce, bit
for bit, what the models were evaluated with (timm/torchvision eval transform for
classification, mmcv's keep-ratio resize and mmseg's sliding windows for dense tasks).
Unlike the rest of the contract they need numpy, Pillow and OpenCV (the service's core
dependencies), so `hornet_bundle` does not import this module itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import Image

from hornet_bundle.manifest import Preprocess, SlidingWindow

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# Resized images up to this many model crops are resized whole (exact); see classification_input.
EXACT_RESIZE_CROPS = 64


def classification_input(
    image: Image.Image, preprocess: Preprocess, size: tuple[int, int] | None = None
) -> np.ndarray:
    """The uint8 HWC crop the classifier was evaluated on (timm/torchvision eval transform).

    shorter_side_center_crop: torchvision Resize(int(size / crop_pct)) then
    CenterCrop(size); direct: Resize((h, w)). Both with PIL's resampling.

    `size` is the (width, height) the sizes are computed from: the image's own unless it
    was decoded at a reduced scale (a JPEG's DCT scaling, `first_resize`), in which case
    it is the upload's, so the resize lands on the same size as from the full image.

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
    size = size or image.size
    if preprocess.resize_mode == "direct":
        return np.asarray(image.resize((width, height), resample), dtype=np.uint8)
    if preprocess.resize_mode != "shorter_side_center_crop":
        raise ValueError(f"resize_mode {preprocess.resize_mode!r} is not a classification mode")
    crop_pct = preprocess.crop_pct or 1.0
    resized_w, resized_h = _shorter_side_size(size, height, width, crop_pct)
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


def first_resize(preprocess: Preprocess, width: int, height: int) -> tuple[int, int] | None:
    """The (width, height) the transform's first resize gives an image of this size, or
    None where the image is used at its own size (a dense model without a `scale`).

    Pixels beyond that size only feed the resize's filter, which is what lets a server
    decode a large JPEG at a reduced scale (`Image.draft`) and resize from there.
    """
    mode = preprocess.resize_mode
    if mode == "direct":
        return preprocess.input_size[1], preprocess.input_size[0]
    if mode == "shorter_side_center_crop":
        crop_h, crop_w = preprocess.input_size
        return _shorter_side_size((width, height), crop_h, crop_w, preprocess.crop_pct or 1.0)
    return fitted_size(preprocess.scale, width, height)


def fitted_size(scale: tuple[int, int] | None, width: int, height: int) -> tuple[int, int] | None:
    """The (width, height) `fit_image` gives an image of this size, or None without a
    `scale` (the image is used as it is): a dense model's first resize."""
    if scale is None:
        return None
    fit_h, fit_w = fit_size(height, width, scale)
    return fit_w, fit_h


def fit_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv rescale_size(keep_ratio=True): the largest size fitting (long, short) scale.

    Each side is at least one pixel (mmcv would give 0 for a 40000x1 image and fail).
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def fit_image(
    image: Image.Image, scale: tuple[int, int], backend: str, size: tuple[int, int] | None = None
) -> np.ndarray:
    """The uint8 HWC image resized to fit `scale` (mmcv imrescale), as the model's
    pipeline resized it: work and memory are those of the fitted image plus one decode.
    The fitted size is computed from `size` (width, height), the image's own by default
    (see classification_input)."""
    width, height = size or image.size
    fit_h, fit_w = fit_size(height, width, scale)
    if backend == "pil":
        resized = image.resize((fit_w, fit_h), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8)
    return resize_linear_uint8(pixels(image), fit_h, fit_w, backend)


def pixels(image: Image.Image) -> np.ndarray:
    """`np.asarray(image, dtype=np.uint8)` for an RGB or L image, copied once.

    numpy reads a PIL image through `Image.tobytes`, which gathers the pixels in pieces
    of 64 KiB and then joins them: two copies of the image, both alive at the join (for
    a 12-megapixel photo 2 x 36 MB, and 17,800 page faults where each is a fresh
    mapping). Here the same raw encoder's pieces go straight into one numpy array. Other
    modes take numpy's way, and so does a Pillow whose (private) encoder interface is
    not the one this was written against: the answer is the same, only slower
    (tests/bundle/test_pixels.py checks the peak, so such a Pillow fails the tests)."""
    channels = {"RGB": 3, "L": 1}.get(image.mode)
    if channels is None or not image.width or not image.height:
        return np.asarray(image, dtype=np.uint8)
    image.load()
    shape = (image.height, image.width, channels) if channels > 1 else image.size[::-1]
    out = np.empty(shape, dtype=np.uint8)
    try:
        _encode_raw_into(image, out.reshape(-1))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return np.asarray(image, dtype=np.uint8)
    return out


def _encode_raw_into(image: Image.Image, flat: np.ndarray) -> None:
    """Pillow's raw encoder (what `Image.tobytes` runs) writing into `flat`."""
    encoder = Image._getencoder(image.mode, "raw", image.mode)
    try:
        encoder.setimage(image.im, (0, 0, *image.size))
        filled, piece = 0, max(1 << 16, image.width * 4)
        while True:
            _, status, data = encoder.encode(piece)
            flat[filled : filled + len(data)] = np.frombuffer(data, dtype=np.uint8)
            filled += len(data)
            if status:
                break
    finally:
        encoder.cleanup()
    if status < 0 or filled != flat.size:
        raise RuntimeError(f"raw encoder error {status} ({filled} of {flat.size} bytes)")


def resize_linear_uint8(array: np.ndarray, height: int, width: int, backend: str) -> np.ndarray:
    """Bilinear resize of an HWC uint8 image as the dense pipelines did it: 'opencv' is
    cv2.INTER_LINEAR (mmcv's imresize, no antialiasing), 'pil' is PIL's bilinear."""
    if backend == "pil":
        image = Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)


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
