"""Uploads in every accepted format and mode are answered as the official pipeline
would answer the image PIL's `convert("RGB")` gives (EXIF orientation applied)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers.images import encode, upload
from tests.helpers.references import official_probabilities, scores_by_index
from tests.helpers.serving import serving

pytestmark = pytest.mark.anyio


async def classify(client, data: bytes) -> np.ndarray:
    response = await client.post("/classify", params={"top_k": 10}, files=upload(data))
    assert response.status_code == 200, response.text
    scores = scores_by_index(response.json()["results"][0])
    return np.array([scores[i] for i in range(10)])


def as_pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("LA", "PNG"),
        ("1", "BMP"),
    ],
)
async def test_image_modes_are_answered_as_their_pil_rgb_conversion(
    classifier_dir, photos, mode: str, fmt: str
) -> None:
    data = encode(Image.fromarray(photos["coffee"]).convert(mode), fmt)
    async with serving([classifier_dir]) as client:
        got = await classify(client, data)
    np.testing.assert_allclose(got, official_probabilities(as_pil_rgb(data)), atol=1e-5)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
async def test_every_supported_format_is_classified(classifier_dir, photos, fmt: str) -> None:
    data = encode(photos["chelsea"], fmt)
    async with serving([classifier_dir]) as client:
        got = await classify(client, data)
    np.testing.assert_allclose(got, official_probabilities(as_pil_rgb(data)), atol=1e-5)


async def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(classifier_dir, photos) -> None:
    grey8 = np.asarray(Image.fromarray(photos["coffee"]).convert("L"))
    grey16 = grey8.astype(np.uint16) * 257
    async with serving([classifier_dir]) as client:
        got = await classify(client, encode(Image.fromarray(grey16)))
    expected = official_probabilities(np.repeat(grey8[..., None], 3, axis=2))
    np.testing.assert_allclose(got, expected, atol=1e-5)


async def test_exif_orientation_is_applied_before_the_transform(classifier_dir, photos) -> None:
    upright = photos["chelsea"]
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # displayed upright after 90 CW
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "PNG", exif=exif)
    async with serving([classifier_dir]) as client:
        got = await classify(client, data)
    np.testing.assert_allclose(got, official_probabilities(upright), atol=1e-5)
    assert not np.allclose(got, official_probabilities(stored), atol=1e-3)


async def test_animated_gif_is_classified_on_its_first_frame(classifier_dir, photos) -> None:
    first, second = (Image.fromarray(photos[n][:300, :400]) for n in ("chelsea", "coffee"))
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second])
    data = buffer.getvalue()
    expected = official_probabilities(as_pil_rgb(data))  # PIL opens on frame 0
    async with serving([classifier_dir]) as client:
        got = await classify(client, data)
    np.testing.assert_allclose(got, expected, atol=1e-5)
