"""Image decoding and the evaluation transforms of the official pipelines.

Everything here is CPU work run off the event loop. The transforms reproduce, bit for
bit, what the model was evaluated with (timm/torchvision eval transform for
classification, mmseg's test pipeline for segmentation), because "same scores as the
official pipeline" is the service's first promise. The parameters come from the
bundle's `manifest.preprocess`, never from constants here. The resize, crop and window
transforms that manifest section describes belong to the bundle contract
(`hornet_bundle.preprocess`, which the demo models also train through); the pipelines
reach them through this module.

Colour conversion follows PIL's `Image.convert("RGB")` (what torchvision/timm loaders
do), with one exception: 16-bit greyscale ('I;16*', 'I') which PIL would clip to 255
(nearly all white). Those are scaled to 8 bits as round(v / 257) (65535 -> 255), and
32-bit float 'F' images are clipped to 0..255 and rounded.
"""

from __future__ import annotations

import ctypes
import io
import logging
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from hornet_bundle import Preprocess
from hornet_bundle.preprocess import classification_input as classification_input
from hornet_bundle.preprocess import first_resize as first_resize
from hornet_bundle.preprocess import fit_image as fit_image
from hornet_bundle.preprocess import fit_size as fit_size
from hornet_bundle.preprocess import fitted_size as fitted_size
from hornet_bundle.preprocess import pixels as pixels
from hornet_bundle.preprocess import tile as tile
from hornet_bundle.preprocess import window_boxes as window_boxes
from service.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from service.image_structure import DEFAULT_MAX_JPEG_SCANS, check_exif, check_structure

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
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_GREY_PIECE_PIXELS = 1 << 18  # 16-bit and float greyscale are scaled this much at a time
_LOGIT_CHUNK_ELEMENTS = 1 << 22
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
_OPEN_FORMATS = tuple(sorted(SUPPORTED_FORMATS - {"MPO"}))  # Pillow opens MPO as JPEG
_EXIF_KEYS = ("exif", "Raw profile type exif")
# What Pillow raises on malformed files: besides its documented OSError, ValueError,
# SyntaxError and EOFError, a TIFF's values of the wrong type or size reach its code as
# TypeError or OverflowError (a float or 2**64-1 strip offset; found by fuzzing), and
# struct.error, IndexError, KeyError or ZeroDivisionError are the same kind of failure.
_UNDECODABLE = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    TypeError,
    OverflowError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    struct.error,
)
_TRANSPOSED = frozenset(range(2, 9))  # EXIF orientations other than 1 (as stored)
# EXIF orientations that turn the stored image a quarter turn (exif_transpose swaps its sides).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def configure_decoding() -> None:
    """Pillow's process-wide settings for a server decoding untrusted uploads (`hornet
    serve` sets them at start):

    - Pillow's own bomb check is off (`Image.MAX_IMAGE_PIXELS`: a warning past 89.5
      megapixels, an error past 179): `decode_image` refuses an image over its
      `max_pixels` (--max-pixels) from the size Image.open read in the header, before any
      pixel is decoded, and Pillow's limit would refuse what --max-pixels allows (a
      200-megapixel phone photo under `--max-pixels 250000000`) with a message of its own.
    - The warnings Pillow gives about an upload's malformed parts (UserWarning: a
      corrupt EXIF block, a truncated read, an invalid APNG) are dropped: the request is
      answered either way (its image decoded, or 400), and otherwise any client could
      have the decoding threads write them to standard error at will, in plain text
      beside the JSON log and waiting on a full pipe. Other warnings go to the JSON log
      (`configure_logging`). libtiff's own messages, which it prints itself, are turned
      off (`quiet_libtiff`).

    Warnings filters are process-wide, so this is done once, before the server's threads
    start (the `warnings.catch_warnings` that each decode used to enter swapped the
    filter list under the other decoding threads)."""
    Image.MAX_IMAGE_PIXELS = None
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
    # Pillow's own log lines are about the files it reads, a client's (an error line for
    # a TIFF's impossible samples per pixel, before it raises): none is written
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    quiet_libtiff()


def quiet_libtiff() -> int:
    """Turn off the default warning and error handlers of the libtiff Pillow decodes
    TIFFs with, which print each message about a file to standard error themselves (C,
    from the decoding thread: a mutated compressed TIFF gives lines such as "ZIPDecode:
    Decoding error at scanline 0, incorrect data check"); Pillow raises for the failure
    anyway (400). The copies of libtiff loaded in this process are found in
    /proc/self/maps (Linux; elsewhere none is found and the handlers stay). How many."""
    Image.init()  # Pillow's C core, and the libtiff it links, are loaded
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libtiff" in line}
    except OSError:
        return 0
    quieted = 0
    for path in paths:
        library = ctypes.CDLL(path)  # the copy already loaded: dlopen finds it by its path
        setters = [getattr(library, f"TIFFSet{kind}Handler", None) for kind in ("Error", "Warning")]
        for setter in filter(None, setters):
            setter.argtypes, setter.restype = [ctypes.c_void_p], ctypes.c_void_p
            setter(None)
        quieted += all(setters)
    return quieted


# The smallest (width, height) worth decoding an upright image of this (width, height)
# at, or None for its full size.
DraftSize = Callable[[int, int], tuple[int, int] | None]


@dataclass(frozen=True)
class Decoded:
    """An upload decoded: upright RGB pixels, and the upload's upright (width, height),
    which is the image's own unless a JPEG was decoded at a reduced scale."""

    image: Image.Image
    size: tuple[int, int]
    reduction: int = 1  # decoded at 1/reduction of its size: 1, 2, 4 or 8

    @property
    def reduced(self) -> bool:
        return self.reduction > 1


def draft_size(first_resize_size: DraftSize, gap: float) -> DraftSize:
    """`decode_image`'s draft: at least `gap` times the size the model's first resize
    gives the image (`first_resize`), so that resize still reduces by `gap` or more."""

    def size(width: int, height: int) -> tuple[int, int] | None:
        needed = first_resize_size(width, height)
        if needed is None:
            return None
        return math.ceil(needed[0] * gap), math.ceil(needed[1] * gap)

    return size


def decode_image(
    data: bytes,
    max_pixels: int,
    max_aspect_ratio: float = 0.0,
    draft: DraftSize | None = None,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> Decoded:
    """Decode an upload to an upright RGB image, refusing bombs before decoding pixels:
    over `max_pixels`, (when `max_aspect_ratio` is not 0) with a longer side over
    `max_aspect_ratio` times the shorter, or a JPEG or PNG whose structure would cost
    more than its pixels (`service.image_structure`: more than `max_jpeg_scans` scans).

    With `draft`, a JPEG larger than twice the upright size `draft` asks for (or more) is
    decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's scaled IDCT (PIL's `draft`), the
    largest reduction that keeps both sides at least that size; other formats, and JPEGs
    without room to reduce, decode at full size. `Decoded.size` stays the upload's."""
    if not data:
        raise BadImage("empty upload: no image bytes received")
    check_structure(data, max_jpeg_scans)
    try:
        # only these formats' plugins ever see an upload: Pillow's others (PSD, FITS, XPM,
        # ...) read their headers in Python and are not checked here; an upload in one of
        # them gets 415 naming it (`_other_format`)
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, where it is on
        raise PayloadTooLarge(f"image refused before decoding: {exc}") from exc
    except UnidentifiedImageError as exc:
        other = _other_format(data)
        if other is not None:
            raise UnsupportedMediaType(
                f"unsupported image format (its first bytes are {other}'s); send JPEG, PNG, "
                "WebP, BMP, TIFF or GIF"
            ) from exc
        raise UnsupportedMediaType(
            "not a recognised image; send JPEG, PNG, WebP, BMP, TIFF or GIF"
        ) from exc
    except _UNDECODABLE as exc:
        raise BadImage(f"undecodable image header: {exc}") from exc
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
    upload: tuple[int, int] | None = None  # upright, when a draft may reduce the decode
    reduction = 1
    try:
        image.seek(0)
        if draft is not None and image.format in _DRAFT_FORMATS:
            turned = _orientation(image) in _QUARTER_TURNS
            upload = (height, width) if turned else (width, height)
            wanted = draft(*upload)
            if wanted is not None:
                stored = (wanted[1], wanted[0]) if turned else wanted
                drafted = image.draft(None, (max(stored[0], 1), max(stored[1], 1)))
                if drafted is not None:  # the box is the stored size over the reduction
                    reduction = round(width / drafted[1][2])
        image.load()  # a PNG's EXIF may follow its pixels
        if _orientation(image) in _TRANSPOSED:
            # The EXIF block is not kept: exif_transpose would re-encode every tag of it
            # without the orientation (an 8x8 PNG carrying 16 MB of EXIF values: 4 s and
            # 0.9 GB). In place: a copy is 36 MB for a 12-megapixel photo.
            for key in _EXIF_KEYS:
                image.info.pop(key, None)
            ImageOps.exif_transpose(image, in_place=True)
    except _UNDECODABLE as exc:
        raise BadImage(f"undecodable or truncated {image.format} image: {exc}") from exc
    return Decoded(to_rgb(image), upload or image.size, reduction)


def _other_format(data: bytes) -> str | None:
    """The unsupported format Pillow would open `data` as, told by the magic bytes each
    plugin accepts (the plugin itself is never run), or None."""
    Image.init()
    prefix = data[:16]  # what Image.open gives each plugin's check
    for name in Image.ID:
        _, accept = Image.OPEN[name]
        if name in SUPPORTED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # noqa: BLE001 - a check that cannot read so few bytes: no match
            continue
    return None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 when none), its block checked first (`check_exif`)."""
    for key in _EXIF_KEYS:  # where Pillow's getexif looks, in its order
        block = image.info.get(key)
        if block is None:
            continue
        if isinstance(block, str):  # ImageMagick's hex profile, as Pillow decodes it
            block = bytes.fromhex("".join(block.split("\n")[3:]))
        check_exif(block)
        break
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if isinstance(orientation, int) else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as PIL's convert gives it, with 16-bit and float greyscale scaled (module doc)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _grey_to_rgb(image, _sixteen_bit_grey)
    if image.mode == "F":
        return _grey_to_rgb(image, _float_grey)
    return image.convert("RGB")


def _sixteen_bit_grey(part: Image.Image) -> np.ndarray:
    values = np.asarray(part.convert("I"), dtype=np.int64)
    return np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)


def _float_grey(part: Image.Image) -> np.ndarray:
    values = np.asarray(part, dtype=np.float32)
    return np.rint(np.clip(np.nan_to_num(values), 0, 255)).astype(np.uint8)


def _grey_to_rgb(image: Image.Image, grey: Callable[[Image.Image], np.ndarray]) -> Image.Image:
    """`grey` (a 16-bit or float image's scaling to uint8) applied a piece of at most
    _GREY_PIECE_PIXELS at a time, pasted into the RGB image. Whole, numpy's int64 and
    float64 temporaries took 26 bytes per pixel for a 16-bit PNG (a 40-megapixel one of
    90 KB: 1 GB per decoding thread) where an RGB upload takes 4; in pieces the peak is
    the decoded image and its RGB copy, as for any mode PIL converts."""
    width, height = image.size
    columns = min(width, _GREY_PIECE_PIXELS)
    rows = max(1, _GREY_PIECE_PIXELS // columns)
    rgb = Image.new("RGB", image.size)
    for top in range(0, height, rows):
        for left in range(0, width, columns):
            box = (left, top, min(left + columns, width), min(top + rows, height))
            piece = Image.fromarray(grey(image.crop(box)), mode="L")
            rgb.paste(piece.convert("RGB"), box[:2])
    return rgb


def normalize_nchw(batch: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """uint8 NHWC -> normalised float32 NCHW, for graphs with normalize_in_graph false."""
    values = batch.astype(np.float32)
    if preprocess.pixel_range == 1:
        values /= 255.0
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    return np.ascontiguousarray(((values - mean) / std).transpose(0, 3, 1, 2))


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
    """argmax over classes of CHW logits resized to (height, width) as F.interpolate
    (bilinear, align_corners False, columns first): uint8 class indices (uint16 beyond
    256 classes), in bounded memory, in time that grows with the class boundaries rather
    than with classes x output pixels.

    Each output pixel blends the same four source pixels for every class with the same
    weights. Where one class is the argmax at all four, it is the argmax of the blend:
    at each source pixel its logit is at least every other class's (above those of lower
    index, which argmax's first-index tie rule needs), and a blend with non-negative
    weights keeps that order, rounding included, since float products and sums are
    monotone. Only the other pixels, along the boundaries between classes, are blended,
    with the same operations as the whole resize, a chunk of pixels at a time (a band
    that is mostly boundaries, noise, is blended whole, a few rows at a time)
    (bench/segment_finish.py: ADE20K's 150 classes at a 3024x4032 photo's size, 1.3 s
    and 37 MiB; blending every pixel, 11.3 s and 3.5 GiB)."""
    channels, in_h, in_w = logits.shape
    dtype = np.uint8 if channels <= 256 else np.uint16
    source = np.empty((in_h, in_w), dtype=dtype)
    rows_per_band = max(1, _LOGIT_CHUNK_ELEMENTS // max(1, channels * in_w))
    for start in range(0, in_h, rows_per_band):
        source[start : start + rows_per_band] = logits[:, start : start + rows_per_band].argmax(0)
    x0, x1, wx = _linear_taps(in_w, width)
    y0, y1, wy = _linear_taps(in_h, height)
    mask = np.empty((height, width), dtype=dtype)
    # Pixels blended at once (a few arrays of channels x these floats), and output rows per
    # band: the band's pixels (its masks and their indices) and the source rows it reads,
    # copied pixel-major so that each blended pixel reads its corners contiguously, stay
    # within a fraction of the chunk.
    pixels_per_chunk = max(1, _LOGIT_CHUNK_ELEMENTS // 4 // max(1, channels))
    source_rows = max(1, _LOGIT_CHUNK_ELEMENTS // 4 // max(1, channels * in_w) - 2)
    rows_per_band = max(
        1, min(_LOGIT_CHUNK_ELEMENTS // 8 // max(1, width), source_rows * height // in_h)
    )
    for start in range(0, height, rows_per_band):
        stop = min(start + rows_per_band, height)
        band, mixed = corner_classes(source, (y0[start:stop], y1[start:stop]), (x0, x1))
        rows, cols = np.nonzero(mixed)
        if 4 * len(rows) > band.size:
            # Mostly boundaries (noise): blending the band's rows whole costs less.
            taps = (y0[start:stop], y1[start:stop], wy[start:stop])
            mask[start:stop] = _blended_argmax_rows(logits, taps, (x0, x1, wx), dtype)
            continue
        if len(rows):
            low, high = int(y0[start]), int(y1[stop - 1]) + 1
            slab = np.ascontiguousarray(logits[:, low:high].transpose(1, 2, 0))
        for first in range(0, len(rows), pixels_per_chunk):
            r = rows[first : first + pixels_per_chunk]
            c = cols[first : first + pixels_per_chunk]
            ry0, ry1, w_y = y0[start + r] - low, y1[start + r] - low, wy[start + r, None]
            cx0, cx1, w_x = x0[c], x1[c], wx[c, None]
            upper = slab[ry0, cx0] * (1 - w_x) + slab[ry0, cx1] * w_x
            lower = slab[ry1, cx0] * (1 - w_x) + slab[ry1, cx1] * w_x
            band[r, c] = (upper * (1 - w_y) + lower * w_y).argmax(axis=1)
        mask[start:stop] = band
    return mask


def corner_classes(
    source: np.ndarray, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """For the output pixels whose bilinear taps `rows` (y0, y1) and `cols` (x0, x1) give:
    the class of each one's first source pixel in the class map `source`, and where its
    four source pixels' classes are not all that one (the pixels to blend)."""
    top, bottom = source[rows[0]], source[rows[1]]
    first = top[:, cols[0]]
    mixed = (
        (first != top[:, cols[1]]) | (first != bottom[:, cols[0]]) | (first != bottom[:, cols[1]])
    )
    return first, mixed


def _blended_argmax_rows(
    logits: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    cols: tuple[np.ndarray, np.ndarray, np.ndarray],
    dtype: type,
) -> np.ndarray:
    """argmax of the logits resized at every pixel of the output rows whose taps `rows`
    gives (`cols`: every column's), columns first as F.interpolate, a few rows at a time:
    the source rows they read are resized across once each."""
    y0, y1, wy = rows
    x0, x1, wx = cols
    channels, width = logits.shape[0], len(x0)
    out = np.empty((len(y0), width), dtype=dtype)
    step = max(1, _LOGIT_CHUNK_ELEMENTS // 4 // max(1, channels * width))
    for first in range(0, len(y0), step):
        upper, lower = y0[first : first + step], y1[first : first + step]
        needed = np.unique(np.concatenate([upper, lower]))
        source = logits[:, needed]
        columns = source[:, :, x0] * (1 - wx) + source[:, :, x1] * wx
        w = wy[first : first + step][None, :, None]
        top = columns[:, np.searchsorted(needed, upper)]
        bottom = columns[:, np.searchsorted(needed, lower)]
        out[first : first + step] = (top * (1 - w) + bottom * w).argmax(axis=0)
    return out


def class_counts(mask: np.ndarray, classes: int) -> np.ndarray:
    """Pixels per class of a class-index mask, counted a band at a time (np.bincount of
    the whole mask would first copy it to int64: 8 bytes per pixel)."""
    counts = np.zeros(classes, dtype=np.int64)
    rows_per_band = max(1, _LOGIT_CHUNK_ELEMENTS // max(1, mask.shape[1]))
    for start in range(0, mask.shape[0], rows_per_band):
        counts += np.bincount(mask[start : start + rows_per_band].ravel(), minlength=classes)
    return counts


def _paste_taps(
    start: int, stop: int, low: float, high: float, cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`grid_sample(align_corners=False)`'s bilinear taps along one axis, for pixel
    centres start + 0.5 .. stop - 0.5 of a box spanning low..high over a map of `cells`:
    indices of the two taps into the map padded with one zero cell on each side (zero
    padding), and the second tap's weight. A zero-length box samples the map's centre
    line, as mmdet's _do_paste_mask (its inf-to-0 replacement) does."""
    centres = np.arange(start, stop, dtype=np.float64) + 0.5
    extent = high - low
    grid = (centres - low) / extent * 2 - 1 if extent > 0 else np.zeros_like(centres)
    position = ((grid + 1) * cells - 1) / 2
    left = np.floor(position)
    frac = (position - left).astype(np.float32)
    left = left.astype(np.int64)
    return np.clip(left, -1, cells) + 1, np.clip(left + 1, -1, cells) + 1, frac


def paste_mask_window(
    mask: np.ndarray, box: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """One detection's square mask probability map pasted into its box on an image of
    `size` (height, width) and thresholded at 0.5 (>=), as mmdet's `_do_paste_mask` +
    `>= mask_thr_binary` do, computed only over the box widened by one pixel (mmdet's
    own CPU region; outside it the mask is empty).

    Returns the uint8 window, column-major (Fortran order, as COCO's RLE reads it), and
    its (y0, y1), (x0, x1) in the image. Bilinear sampling is separable: the map is
    first sampled along y at the window's rows (a small array of map columns); then the
    window's columns between the same two map columns form runs along which each row's
    value moves linearly from one map column to the next, crossing 0.5 at most once,
    so each run is found by one comparison per pixel (memory: the window plus one run
    of columns, about 1/28 of the box, as booleans)."""
    height, width = size
    x0 = min(max(int(np.floor(box[0])) - 1, 0), width)
    y0 = min(max(int(np.floor(box[1])) - 1, 0), height)
    x1 = min(max(int(np.ceil(box[2])) + 1, x0), width)
    y1 = min(max(int(np.ceil(box[3])) + 1, y0), height)
    cells_y, cells_x = mask.shape
    padded = np.zeros((cells_y + 2, cells_x + 2), dtype=np.float32)
    padded[1:-1, 1:-1] = mask
    first, second, frac = _paste_taps(y0, y1, float(box[1]), float(box[3]), cells_y)
    down = padded[first] * (1 - frac)[:, None] + padded[second] * frac[:, None]
    down = np.ascontiguousarray(down.T)  # (map columns, window rows)
    columns = np.empty((x1 - x0, y1 - y0), dtype=np.uint8)  # the window, transposed
    first, second, frac = _paste_taps(x0, x1, float(box[0]), float(box[2]), cells_x)
    taps = first * (cells_x + 2) + second  # equal taps, equal `left` (or both taps zero)
    bounds = np.flatnonzero(np.diff(taps, prepend=-1)).tolist() + [first.size]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        low = down[first[start]]
        step = down[second[start]] - low
        run = frac[start:stop]  # increasing along the run
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing = (np.float32(0.5) - low) / step
        falling = step < 0
        first_on = np.where(
            falling,
            np.searchsorted(run, crossing, side="right"),
            np.searchsorted(run, crossing, side="left"),
        )
        first_on = np.where(step == 0, np.where(low >= 0.5, 0, run.size), first_on)
        index = np.arange(run.size)[:, None]
        np.not_equal(index >= first_on, falling, out=columns[start:stop].view(bool))
    return columns.T, (y0, y1), (x0, x1)
