"""What the test classifier should answer for a photo, computed without the service:
torchvision's eval crop (the official HorNet transform), then the float64 numpy model."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torchvision import transforms

from tests.helpers import bundles

OFFICIAL_CROP = transforms.Compose(
    [
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.PILToTensor(),
    ]
)


def crop_of(array: np.ndarray) -> np.ndarray:
    """The uint8 HWC crop /classify feeds the graph for this photo."""
    return OFFICIAL_CROP(Image.fromarray(array)).permute(1, 2, 0).numpy()


def official_probabilities(array: np.ndarray) -> np.ndarray:
    """The test classifier's softmax on the torchvision eval crop, in float64 numpy."""
    return bundles.reference_probabilities(crop_of(array))


def scores_by_index(result: dict) -> dict[int, float]:
    return {entry["index"]: entry["score"] for entry in result["top_k"]}


def assert_official_scores(result: dict, array: np.ndarray) -> None:
    """A /classify result whose top_k holds every class: its scores are the reference
    probabilities of the photo `array`."""
    expected = official_probabilities(array)
    scores = scores_by_index(result)
    np.testing.assert_allclose([scores[i] for i in range(len(expected))], expected, atol=1e-5)
