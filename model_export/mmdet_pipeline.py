"""mmdet 2.28's detection test pipeline around the mmdet-layout detectors, on the host.

Before the network (LoadImage, Resize keep_ratio, Normalize, Pad): fit the image in
`scale` (long, short) keeping its ratio with OpenCV bilinear as `mmcv.imrescale` does,
normalise with the config's mean/std on 0-255 RGB, pad bottom/right with zeros to a
multiple of 32. After it (`rescale=True`): boxes divided by the per-axis scale factors,
each 28x28 mask probability map pasted onto the original image as mmdet's
`_do_paste_mask` pastes it (grid_sample, align_corners=False) and thresholded at 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

SCALE = (1333, 800)
SIZE_DIVISOR = 32
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class Prepared:
    """The network input of one image and what it takes to map results back."""

    image: torch.Tensor  # (1, 3, H, W), H and W multiples of 32
    image_shape: tuple[int, int]  # resized (height, width) before padding
    scale_factor: tuple[float, float]  # (width, height) resized / original
    original_shape: tuple[int, int]


def rescale_size(height: int, width: int, scale: Sequence[int] = SCALE) -> tuple[int, int]:
    """mmcv.rescale_size: the (height, width) fitting `scale` (long, short) at the same
    ratio, each side int(side * factor + 0.5)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def prepare(
    rgb: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[int] = SCALE,
    size_divisor: int = SIZE_DIVISOR,
) -> Prepared:
    """mmdet's test pipeline on a uint8 RGB (H, W, 3) image."""
    height, width = rgb.shape[:2]
    new_h, new_w = rescale_size(height, width, scale)
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    normalised = (resized.astype(np.float32) - np.float32(mean)) / np.float32(std)
    pad_h = -(-new_h // size_divisor) * size_divisor
    pad_w = -(-new_w // size_divisor) * size_divisor
    padded = np.zeros((pad_h, pad_w, 3), np.float32)
    padded[:new_h, :new_w] = normalised
    image = torch.from_numpy(padded).permute(2, 0, 1)[None].contiguous()
    return Prepared(image, (new_h, new_w), (new_w / width, new_h / height), (height, width))


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """mmdet's _do_paste_mask over the whole image: (D, 28, 28) probabilities placed in
    their boxes (D, 4) of a `height` x `width` image, sampled at pixel centres."""
    if masks.shape[0] == 0:
        return masks.new_zeros(0, height, width)
    x0, y0, x1, y1 = boxes.float().split(1, dim=1)
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.nan_to_num((ys - y0) / (y1 - y0) * 2 - 1, posinf=0.0, neginf=0.0)
    xs = torch.nan_to_num((xs - x0) / (x1 - x0) * 2 - 1, posinf=0.0, neginf=0.0)
    count = masks.shape[0]
    grid = torch.stack(
        [xs[:, None, :].expand(count, height, width), ys[:, :, None].expand(count, height, width)],
        dim=3,
    )
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0]


def finish(result: dict[str, torch.Tensor], prepared: Prepared) -> dict[str, np.ndarray]:
    """Detections in original-image pixels with binary full-size masks (mmdet's
    `rescale=True` results): boxes (D, 4), scores (D,), labels (D,), masks (D, H, W)."""
    w_scale, h_scale = prepared.scale_factor
    factor = torch.tensor([w_scale, h_scale, w_scale, h_scale], dtype=torch.float32)
    boxes = result["boxes"] / factor
    height, width = prepared.original_shape
    masks = paste_masks(result["masks"], boxes, height, width) >= MASK_THRESHOLD
    return {
        "boxes": boxes.numpy(),
        "scores": result["scores"].numpy(),
        "labels": result["labels"].numpy(),
        "masks": masks.numpy(),
    }
