"""Training batches of synthetic shapes, repainted with broad appearance (`appearance`)
and put through the preprocessing the bundles are served with (`hornet_bundle.preprocess`),
so the models learn from what the served graphs see."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from hornet_bundle import Preprocess
from hornet_bundle.preprocess import (
    classification_input,
    fit_size,
    resize_linear_uint8,
    tile,
    window_boxes,
)
from model_export.demo.appearance import random_size, repaint
from model_export.demo.shapes import Scene, generate_scene

# Training images: the longer side in this range, aspect ratios up to MAX_ASPECT.
TRAIN_SIDES = (64, 320)
MAX_ASPECT = 3.0
# Shape radius (centre to farthest point) as a fraction of the shorter side: one shape
# anywhere in the image for classification, one to four for the dense tasks.
SAMPLE_RADIUS = (0.08, 0.45)
SCENE_RADIUS = (0.06, 0.3)


def training_scene(
    rng: np.random.Generator, single: bool = False, plain_share: float = 0.0
) -> Scene:
    """A repainted scene of random size: one shape when `single`, else one to four; with
    probability `plain_share` left as the generator painted it (flat, noisy or gradient
    background, high contrast, hard edges)."""
    height, width = random_size(rng, TRAIN_SIDES, MAX_ASPECT)
    if single:
        scene = generate_scene(rng, height, width, num_shapes=(1, 1), radius_range=SAMPLE_RADIUS)
    else:
        scene = generate_scene(rng, height, width, radius_range=SCENE_RADIUS)
    # No draw when there is no share: the recipes without one repeat their recorded runs.
    if plain_share and rng.random() < plain_share:
        return scene
    return repaint(rng, scene)


def normalise(batch: np.ndarray, mean, std, pixel_range: int) -> torch.Tensor:
    """uint8 NHWC -> float NCHW normalised as the exported graph does inside."""
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    if pixel_range == 1:
        x = x / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def augment(images: torch.Tensor, rng: np.random.Generator, *targets: torch.Tensor):
    """Random flips and quarter turns, applied alike to images (N, C, H, W) and targets
    (N, H, W): the shapes' classes are invariant under them."""
    if rng.random() < 0.5:
        images, targets = images.flip(-1), tuple(t.flip(-1) for t in targets)
    turns = int(rng.integers(4))
    images = torch.rot90(images, turns, (-2, -1))
    return (images, *(torch.rot90(t, turns, (-2, -1)) for t in targets))


def classification_pool(
    rng: np.random.Generator, preprocess: Preprocess, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`size` one-shape images through the service's classification preprocessing, their
    labels and their class masks resized the same way (nearest): uint8 (N, H, W, 3),
    int64 (N,), uint8 (N, H, W) with 0 background and 1 + label on the shape."""
    height, width = preprocess.input_size
    crops, labels, masks = [], [], []
    for _ in range(size):
        scene = training_scene(rng, single=True)
        crops.append(classification_input(Image.fromarray(scene.image), preprocess))
        labels.append(int(scene.labels[0]))
        mask = Image.fromarray(scene.class_mask).resize((width, height), Image.Resampling.NEAREST)
        masks.append(np.asarray(mask))
    return np.stack(crops), np.array(labels, dtype=np.int64), np.stack(masks)


def segmentation_tile(
    rng: np.random.Generator, preprocess: Preprocess, plain_share: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """One scene (`training_scene`) fitted to the bundle's scale and cut into one of the
    service's sliding windows, chosen at random; the class mask follows with nearest
    resizing, and 255 (ignored) on any padding."""
    scene = training_scene(rng, plain_share=plain_share)
    height, width = scene.class_mask.shape
    fit_h, fit_w = fit_size(height, width, preprocess.scale)
    image = resize_linear_uint8(scene.image, fit_h, fit_w, preprocess.resize_backend)
    mask = np.asarray(
        Image.fromarray(scene.class_mask).resize((fit_w, fit_h), Image.Resampling.NEAREST)
    )
    window = preprocess.sliding_window
    boxes = list(window_boxes(fit_h, fit_w, window))
    box = boxes[int(rng.integers(len(boxes)))]
    y1, y2, x1, x2 = box
    target = np.full(window.crop, 255, dtype=np.uint8)
    target[: y2 - y1, : x2 - x1] = mask[y1:y2, x1:x2]
    return tile(image, box, window.crop), target


def detection_sample(rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """One scene as torchvision's detection input: float CHW in [0, 1] and its targets
    (labels shifted by one: torchvision's class 0 is the background)."""
    scene = training_scene(rng)
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0
    target = {
        "boxes": torch.from_numpy(scene.boxes),
        "labels": torch.from_numpy(scene.labels + 1),
        "masks": torch.from_numpy(scene.masks.astype(np.uint8)),
    }
    return image, target
