"""Synthetic "shapes" images with exact ground truth, for the demo models and their tests.

Filled circles, squares and triangles of random colour, size, position and rotation on a
plain, noisy or gradient background. Each shape is rasterised once as a binary mask and
painted through it, so the masks, boxes and labels are exact by construction: no
anti-aliasing, no pixel of a shape left out of its mask. Later shapes occlude earlier
ones; the instance masks and boxes describe what stays visible.

Only numpy and Pillow: the torch-free service tests use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle")
SEGMENT_LABELS = ("background", *CLASS_NAMES)
BACKGROUNDS = ("plain", "noise", "gradient")
# Shapes must stand out from what they are painted over: minimum RGB distance (0-441).
MIN_CONTRAST = 110.0
# Each placed shape keeps at least this fraction of its pixels visible.
MIN_VISIBLE = 0.7
# Shape radius (centre to farthest point) as a fraction of the image's shorter side.
SCENE_RADIUS = (0.09, 0.2)
SAMPLE_RADIUS = (0.18, 0.34)
MIN_RADIUS_PX = 5.0
_PLACEMENT_TRIES = 30
_COLOUR_TRIES = 40


@dataclass(frozen=True)
class Scene:
    """One generated image and its ground truth.

    image: uint8 (H, W, 3) RGB.
    class_mask: uint8 (H, W); 0 background, i + 1 for CLASS_NAMES[i].
    labels: int64 (N,), index into CLASS_NAMES, in drawing order.
    masks: bool (N, H, W), the visible pixels of each instance.
    boxes: float32 (N, 4), x1, y1, x2, y2 tight around each visible mask, in pixel-edge
      coordinates (a shape covering columns 3..7 has x1 = 3, x2 = 8).
    """

    image: np.ndarray
    class_mask: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The tight pixel-edge box (x1, y1, x2, y2) of a non-empty binary mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask_box of an empty mask")
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def shape_outline(
    label: int, centre: tuple[float, float], radius: float, angle: float
) -> list[tuple[float, float]]:
    """The polygon of a square or triangle inscribed in the circle (centre, radius),
    rotated by `angle` radians; circles have no outline (drawn as an ellipse)."""
    corners = {1: 4, 2: 3}.get(label)
    if corners is None:
        raise ValueError(f"{CLASS_NAMES[label]} has no polygon outline")
    cx, cy = centre
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / corners),
            cy + radius * math.sin(angle + 2 * math.pi * k / corners),
        )
        for k in range(corners)
    ]


def shape_mask(
    height: int, width: int, label: int, centre: tuple[float, float], radius: float, angle: float
) -> np.ndarray:
    """The binary (H, W) mask of one filled shape, rasterised by Pillow without smoothing."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if CLASS_NAMES[label] == "circle":
        cx, cy = centre
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    else:
        draw.polygon(shape_outline(label, centre, radius, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def background(rng: np.random.Generator, height: int, width: int, kind: str) -> np.ndarray:
    """A float (H, W, 3) background in 0-255: one colour, noise around one, or a gradient."""
    base = rng.uniform(0, 255, 3)
    if kind == "plain":
        return np.broadcast_to(base, (height, width, 3)).copy()
    if kind == "noise":
        noise = rng.normal(0, rng.uniform(8, 30), (height, width, 3))
        return np.clip(base + noise, 0, 255)
    if kind == "gradient":
        other = np.clip(base + rng.uniform(-90, 90, 3), 0, 255)
        theta = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        along = xs * math.cos(theta) + ys * math.sin(theta)
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
        return base + (other - base) * t[..., None]
    raise ValueError(f"background kind must be one of {BACKGROUNDS}, got {kind!r}")


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least MIN_CONTRAST from the mean colour it is painted over
    (the farthest of the tries when none reaches it)."""
    best, best_distance = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.integers(0, 256, 3)
        distance = float(np.linalg.norm(colour - under))
        if distance >= MIN_CONTRAST:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _place(
    rng: np.random.Generator,
    height: int,
    width: int,
    label: int,
    radius_range: tuple[float, float],
    region: tuple[float, float, float, float],
    visible: list[np.ndarray],
) -> np.ndarray | None:
    """A mask for a new shape inside `region` (x1, y1, x2, y2) that leaves every earlier
    instance at least MIN_VISIBLE of its pixels, or None when no try fits."""
    short = min(height, width)
    for _ in range(_PLACEMENT_TRIES):
        radius = max(MIN_RADIUS_PX, rng.uniform(*radius_range) * short)
        x1, y1, x2, y2 = region
        if x2 - x1 < 2 * radius or y2 - y1 < 2 * radius:
            radius = max(1.0, min(x2 - x1, y2 - y1) / 2 - 1)
        centre = (rng.uniform(x1 + radius, x2 - radius), rng.uniform(y1 + radius, y2 - radius))
        mask = shape_mask(height, width, label, centre, radius, rng.uniform(0, 2 * math.pi))
        if not mask.any():
            continue
        if all((m & ~mask).sum() >= MIN_VISIBLE * m.sum() for m in visible):
            return mask
    return None


def _scene_from(
    rng: np.random.Generator,
    height: int,
    width: int,
    labels: list[int],
    radius_range: tuple[float, float],
    region: tuple[float, float, float, float],
) -> Scene:
    image = background(rng, height, width, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    visible: list[np.ndarray] = []
    placed: list[int] = []
    for label in labels:
        mask = _place(rng, height, width, label, radius_range, region, visible)
        if mask is None:
            continue
        image[mask] = _contrasting_colour(rng, image[mask].mean(axis=0))
        visible = [m & ~mask for m in visible] + [mask]
        placed.append(label)
    image = np.rint(image).astype(np.uint8)
    class_mask = np.zeros((height, width), dtype=np.uint8)
    for label, mask in zip(placed, visible, strict=True):
        class_mask[mask] = label + 1
    masks = np.stack(visible) if visible else np.zeros((0, height, width), dtype=bool)
    boxes = np.array([mask_box(m) for m in visible], dtype=np.float32).reshape(-1, 4)
    return Scene(image, class_mask, np.array(placed, dtype=np.int64), masks, boxes)


def generate_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_shapes: tuple[int, int] = (1, 4),
    radius_range: tuple[float, float] = SCENE_RADIUS,
) -> Scene:
    """An image of `num_shapes` (inclusive range) random shapes anywhere in the frame.

    A shape that finds no place leaving the earlier ones visible enough is left out, so
    a scene may hold fewer shapes than drawn (never zero when one fits).
    """
    count = int(rng.integers(num_shapes[0], num_shapes[1] + 1))
    labels = [int(rng.integers(len(CLASS_NAMES))) for _ in range(count)]
    return _scene_from(rng, height, width, labels, radius_range, (0, 0, width, height))


def generate_sample_scene(
    rng: np.random.Generator, height: int, width: int, radius_range=SAMPLE_RADIUS
) -> Scene:
    """A classification scene: one shape inside the central square of the image, which is
    what a centre-cropping classifier sees."""
    label = int(rng.integers(len(CLASS_NAMES)))
    side = min(height, width) * 0.85
    region = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return _scene_from(rng, height, width, [label], radius_range, region)


def generate_sample(
    rng: np.random.Generator, height: int, width: int, radius_range=SAMPLE_RADIUS
) -> tuple[np.ndarray, int]:
    """A classification sample: the image of `generate_sample_scene` and its label index
    into CLASS_NAMES."""
    scene = generate_sample_scene(rng, height, width, radius_range)
    return scene.image, int(scene.labels[0])


def main(argv: list[str] | None = None) -> None:
    """Write one generated image as PNG and print its ground truth as JSON.

    python -m model_export.demo.shapes scene.png [--size 240x160] [--seed 7] [--single]
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(
        description="Write a synthetic shapes image (PNG) and "
        "print its ground truth (labels, boxes) as JSON."
    )
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--size", default="240x160", help="WIDTHxHEIGHT (default 240x160)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--single", action="store_true", help="one centred shape (what the classifier expects)"
    )
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    if min(width, height) < 16:
        parser.error("--size: both sides must be at least 16 pixels")
    rng = np.random.default_rng(args.seed)
    scene = (generate_sample_scene if args.single else generate_scene)(rng, height, width)
    Image.fromarray(scene.image).save(args.out, format="PNG")
    print(
        json.dumps(
            {
                "file": args.out,
                "width": width,
                "height": height,
                "shapes": [
                    {"label": CLASS_NAMES[label], "box": [round(float(v), 1) for v in box]}
                    for label, box in zip(scene.labels, scene.boxes, strict=True)
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
