"""Broad appearance for the demo training images: the shapes generator's exact geometry
(labels, visible masks, boxes) repainted over varied backgrounds with varied edges and
camera effects, so that the models learn the shapes rather than one way of drawing them.

Each training image draws, independently: a background (plain, noise, gradient, a
texture or a photograph from scikit-image's bundled images, stretched or zoomed), shape
colours at a lower contrast than the generator's (a mean RGB distance from 45 up), hard
or anti-aliased edges, a mild blur, sensor noise, a lower overall contrast and a JPEG
round trip at quality 50-95. The masks stay the generator's: a pixel belongs to a shape
when the generator's rasterisation says so, whatever its edge looks like.
"""

from __future__ import annotations

import functools
import io
import math

import cv2
import numpy as np
from PIL import Image

from model_export.demo.shapes import Scene, background

# scikit-image's bundled images used as backgrounds: textures and photographs. Its
# others (camera, coins, moon, text, retina, cell) are left to evaluation.
TEXTURES = ("brick", "grass", "gravel")
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "page",
    "clock",
)
# The background kinds and how often each is drawn.
BACKGROUND_WEIGHTS = {"plain": 1, "noise": 1, "gradient": 1, "texture": 1.5, "photo": 2.5}
# Mean RGB distance (0-441) of a shape's colour from what it is painted on: drawn from
# this range for each shape (the generator keeps 110 or more).
CONTRAST = (45.0, 160.0)
JPEG_QUALITY = (50, 95)
_COLOUR_TRIES = 40


@functools.cache
def _library_image(name: str) -> np.ndarray:
    """A scikit-image data image as float RGB (grey ones repeated over three channels)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _library_background(rng: np.random.Generator, height: int, width: int, names) -> np.ndarray:
    """A random window of one of `names`, zoomed 0.4-2x and resized (aspect not kept) to
    the image, sometimes mirrored or with its colours turned."""
    source = _library_image(str(names[int(rng.integers(len(names)))]))
    zoom = rng.uniform(0.4, 2.0)
    crop_h = int(np.clip(height / zoom, 16, source.shape[0]))
    crop_w = int(np.clip(width / zoom * rng.uniform(0.7, 1.4), 16, source.shape[1]))
    top = int(rng.integers(source.shape[0] - crop_h + 1))
    left = int(rng.integers(source.shape[1] - crop_w + 1))
    window = source[top : top + crop_h, left : left + crop_w]
    image = cv2.resize(window, (width, height), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.3:
        image = image[..., rng.permutation(3)]
    if rng.random() < 0.3:
        tint = rng.uniform(0.6, 1.3, 3)
        image = image * tint
    return np.clip(image, 0, 255).astype(np.float64)


def varied_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float (H, W, 3) background in 0-255 of a kind drawn by BACKGROUND_WEIGHTS."""
    kinds = list(BACKGROUND_WEIGHTS)
    weights = np.array(list(BACKGROUND_WEIGHTS.values()))
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind == "texture":
        return _library_background(rng, height, width, TEXTURES)
    if kind == "photo":
        return _library_background(rng, height, width, PHOTOS)
    return background(rng, height, width, kind)


def _colour_against(rng: np.random.Generator, under: np.ndarray, contrast: float) -> np.ndarray:
    """A random colour at least `contrast` from `under` (the farthest tried when none is)."""
    best, best_distance = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.uniform(0, 255, 3)
        distance = float(np.linalg.norm(colour - under))
        if distance >= contrast:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _coverage(rng: np.random.Generator, mask: np.ndarray, smooth: bool) -> np.ndarray:
    """How much of each pixel the shape covers: its mask, or with anti-aliased edges a
    blur of it (half covered on the mask's edge)."""
    alpha = mask.astype(np.float32)
    if not smooth:
        return alpha
    sigma = rng.uniform(0.4, 0.8)
    return cv2.GaussianBlur(alpha, (0, 0), sigma)


def _camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Lower contrast, blur, noise and a JPEG round trip, each drawn independently."""
    if rng.random() < 0.3:
        factor = rng.uniform(0.5, 0.9)
        image = image.mean(axis=(0, 1)) + (image - image.mean(axis=(0, 1))) * factor
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.3))
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(2, 12), image.shape)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if rng.random() < 0.8:
        buffer = io.BytesIO()
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        pixels = np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return pixels


def repaint(rng: np.random.Generator, scene: Scene) -> Scene:
    """`scene` with a varied background, colours, edges and camera effects; its labels,
    masks and boxes unchanged."""
    height, width = scene.class_mask.shape
    image = varied_background(rng, height, width)
    smooth = rng.random() < 0.6
    for mask in scene.masks:
        contrast = rng.uniform(*CONTRAST)
        colour = _colour_against(rng, image[mask].mean(axis=0), contrast)
        alpha = _coverage(rng, mask, smooth)[..., None]
        image = image * (1 - alpha) + colour * alpha
    return Scene(_camera(rng, image), scene.class_mask, scene.labels, scene.masks, scene.boxes)


def random_size(rng: np.random.Generator, sides: tuple[int, int], max_aspect: float = 3.0):
    """(height, width): the longer side in `sides`, the shorter by up to `max_aspect`
    (never under `sides`' low end / 2), either way round."""
    long_side = int(rng.integers(*sides))
    ratio = math.exp(rng.uniform(0, math.log(max_aspect)))
    short_side = max(sides[0] // 2, int(long_side / ratio))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
