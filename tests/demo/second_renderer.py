"""A second, independent renderer of circles, squares and triangles, for judging the demo
models on images their training generator never drew.

It shares no code with `model_export.demo` (nor imports it): shapes are rasterised
from signed distances in numpy (the training generator fills Pillow polygons), edges are
anti-aliased from the distance or left hard, and its parameters are its own: image
sides 96-320 with aspect ratios up to 3:1, shapes anywhere in the frame, any rotation,
plain, noisy, gradient or photographic backgrounds (scikit-image photographs the demo
training does not use), mild blur, sensor noise, and JPEG at quality 50-95 for most
images. The ground truth is the shape's own geometry: a pixel belongs to a shape when
its centre lies inside it.

Only numpy, Pillow and scikit-image's bundled images (the torch-free tests use it).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

LABELS = ("circle", "square", "triangle")
# Photographs of scikit-image's data package kept for evaluation: the demo training draws
# its photographic backgrounds from the others.
PHOTOS = ("camera", "coins", "moon", "text", "retina", "cell")
SIDES = (96, 320)
MAX_ASPECT = 3.0
MIN_SHORT_SIDE = 64
# Circumradius as a fraction of the image's shorter side.
SINGLE_RADIUS = (0.15, 0.4)
SCENE_RADIUS = (0.08, 0.2)
MIN_RADIUS_PX = 6.0
# Mean RGB distance (0-441) at least between a shape and what it is drawn on.
MIN_CONTRAST = 90.0
# Fraction of images left PNG (lossless); the rest are JPEG.
PNG_SHARE = 0.2
JPEG_QUALITY = (50, 95)


@dataclass(frozen=True)
class Drawn:
    """One rendered image and its truth.

    encoded: the file a client would upload (JPEG or PNG).
    labels: int (N,), index into LABELS.
    masks: bool (N, H, W), each shape's pixels (centre inside the shape).
    boxes: float (N, 4), x1, y1, x2, y2 pixel edges around each mask.
    class_mask: uint8 (H, W), 0 background, i + 1 for LABELS[i].
    """

    encoded: bytes
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    class_mask: np.ndarray


def signed_distance(
    label: int,
    xs: np.ndarray,
    ys: np.ndarray,
    centre: tuple[float, float],
    radius: float,
    angle: float,
) -> np.ndarray:
    """Distance in pixels outside the shape (negative inside) at points (xs, ys).

    A circle of `radius`; a square or equilateral triangle of circumradius `radius`
    turned by `angle`, as the largest distance past any of its edges (exact inside and
    along the edges, which is all that edges and coverage need).
    """
    dx, dy = xs - centre[0], ys - centre[1]
    if LABELS[label] == "circle":
        return np.hypot(dx, dy) - radius
    sides = 4 if LABELS[label] == "square" else 3
    apothem = radius * math.cos(math.pi / sides)
    normals = [angle + math.pi / sides + 2 * math.pi * k / sides for k in range(sides)]
    return np.max([dx * math.cos(t) + dy * math.sin(t) - apothem for t in normals], axis=0)


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width): the longer side in SIDES, the other shorter by up to MAX_ASPECT
    (and at least MIN_SHORT_SIDE)."""
    long_side = int(rng.integers(SIDES[0], SIDES[1] + 1))
    short_side = max(MIN_SHORT_SIDE, int(long_side / rng.uniform(1.0, MAX_ASPECT)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


@functools.cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float (H, W, 3) in 0-255: a colour, a noisy colour, a two-colour ramp or a photo."""
    kind = rng.choice(["plain", "noisy", "ramp", "photo", "photo"])
    colour = rng.uniform(20, 235, 3)
    if kind == "plain":
        return np.ones((height, width, 3)) * colour
    if kind == "noisy":
        return np.clip(colour + rng.normal(0, rng.uniform(5, 25), (height, width, 3)), 0, 255)
    if kind == "ramp":
        ys = np.linspace(0, 1, height)[:, None, None]
        xs = np.linspace(0, 1, width)[None, :, None]
        weight = np.clip(rng.uniform(-1, 1) * xs + rng.uniform(-1, 1) * ys + 0.5, 0, 1)
        return colour * (1 - weight) + rng.uniform(20, 235, 3) * weight
    photo = _photo(str(rng.choice(PHOTOS)))
    zoom = rng.uniform(0.5, 1.5)
    crop_h = min(photo.shape[0], max(8, int(height / zoom)))
    crop_w = min(photo.shape[1], max(8, int(width / zoom)))
    top = int(rng.integers(0, photo.shape[0] - crop_h + 1))
    left = int(rng.integers(0, photo.shape[1] - crop_w + 1))
    crop = Image.fromarray(photo[top : top + crop_h, left : left + crop_w].astype(np.uint8))
    return np.asarray(crop.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float64)


def _colour_against(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A colour at least MIN_CONTRAST from `under` (the farthest corner of the RGB cube
    when no random one is)."""
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            return colour
    return np.where(under < 128, 255.0, 0.0)


def _finish(rng: np.random.Generator, image: np.ndarray) -> bytes:
    """Optional blur and noise, then the upload: JPEG at a random quality, or PNG."""
    picture = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    if rng.random() < 0.3:
        noisy = np.asarray(picture, dtype=np.float64) + rng.normal(0, 6, (*image.shape[:2], 3))
        picture = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    if rng.random() < PNG_SHARE:
        picture.save(buffer, format="PNG")
    else:
        picture.save(buffer, format="JPEG", quality=int(rng.integers(*JPEG_QUALITY, endpoint=True)))
    return buffer.getvalue()


def _mask_box(mask: np.ndarray) -> list[float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def render(rng: np.random.Generator, count: int, radius_range: tuple[float, float]) -> Drawn:
    """An image of up to `count` shapes, each wholly inside the frame and apart from the
    others by a few pixels (a shape that finds no free place is left out; the first
    always fits)."""
    height, width = _image_size(rng)
    image = _background(rng, height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    taken = np.zeros((height, width), dtype=bool)
    labels, masks = [], []
    anti_aliased = rng.random() < 0.6
    for _ in range(count):
        label = int(rng.integers(len(LABELS)))
        for _ in range(40):
            radius = max(MIN_RADIUS_PX, rng.uniform(*radius_range) * min(height, width))
            centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
            distance = signed_distance(label, xs, ys, centre, radius, rng.uniform(0, 2 * math.pi))
            mask = distance <= 0
            if mask.sum() >= 16 and not (taken & (distance <= 3)).any():
                break
        else:
            continue
        coverage = np.clip(0.5 - distance, 0, 1) if anti_aliased else mask.astype(np.float64)
        colour = _colour_against(rng, image[mask].mean(axis=0))
        image = image * (1 - coverage[..., None]) + colour * coverage[..., None]
        taken |= mask
        labels.append(label)
        masks.append(mask)
    class_mask = np.zeros((height, width), dtype=np.uint8)
    for label, mask in zip(labels, masks, strict=True):
        class_mask[mask] = label + 1
    return Drawn(
        encoded=_finish(rng, image),
        labels=np.array(labels, dtype=np.int64),
        masks=np.stack(masks),
        boxes=np.array([_mask_box(m) for m in masks], dtype=np.float64),
        class_mask=class_mask,
    )


def render_single(rng: np.random.Generator) -> Drawn:
    """One shape, for classification."""
    return render(rng, 1, SINGLE_RADIUS)


def render_scene(rng: np.random.Generator) -> Drawn:
    """One to four shapes, for segmentation and detection."""
    return render(rng, int(rng.integers(1, 5)), SCENE_RADIUS)
