"""Every client mistake gets its status and a JSON body {"error": CODE, "detail": ...}."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.helpers.images import encode, upload
from tests.helpers.serving import serving

pytestmark = pytest.mark.anyio


def assert_error(response, status: int, code: str, *, detail_has: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == code
    assert detail_has in str(body["detail"])


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height; its pixel data is a few bytes only,
    so a server that decoded the pixels would fail as truncated, not refuse the size."""
    data = bytearray(encode(np.zeros((2, 2, 3), np.uint8)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


async def test_truncated_image_is_400(classifier_dir, photos) -> None:
    data = encode(photos["chelsea"], "JPEG")
    async with serving([classifier_dir]) as client:
        response = await client.post("/classify", files=upload(data[: len(data) // 2]))
    assert_error(response, 400, "bad_image", detail_has="truncated")


async def test_empty_upload_is_400(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.post(
            "/classify", content=b"", headers={"content-type": "image/png"}
        )
    assert_error(response, 400, "bad_image", detail_has="empty")


async def test_body_over_the_upload_limit_is_413(classifier_dir) -> None:
    async with serving([classifier_dir], max_upload_mb=0.01) as client:
        response = await client.post(
            "/classify", content=b"\0" * 20_000, headers={"content-type": "image/png"}
        )
    assert_error(response, 413, "payload_too_large", detail_has="10485 bytes")


async def test_streamed_body_over_the_upload_limit_is_413(classifier_dir) -> None:
    async def chunks():
        for _ in range(10):
            yield b"\0" * 4096

    async with serving([classifier_dir], max_upload_mb=0.01) as client:
        response = await client.post(
            "/classify", content=chunks(), headers={"content-type": "image/png"}
        )
    assert_error(response, 413, "payload_too_large", detail_has="upload limit")


async def test_image_over_the_pixel_limit_is_413(classifier_dir, photos) -> None:
    async with serving([classifier_dir], max_pixels=100_000) as client:
        response = await client.post("/classify", files=upload(encode(photos["chelsea"])))
    assert_error(response, 413, "payload_too_large", detail_has="451x300 = 135300 pixels")


async def test_decompression_bomb_is_refused_before_its_pixels_are_decoded(
    classifier_dir,
) -> None:
    bomb = png_claiming_size(50_000, 50_000)
    assert len(bomb) < 100
    async with serving([classifier_dir]) as client:
        response = await client.post("/classify", files=upload(bomb))
    assert_error(response, 413, "payload_too_large", detail_has="refused before decoding")


async def test_too_many_pixels_are_refused_before_decoding(classifier_dir) -> None:
    async with serving([classifier_dir], max_pixels=1_000_000) as client:
        response = await client.post("/classify", files=upload(png_claiming_size(2000, 1000)))
    assert_error(response, 413, "payload_too_large", detail_has="2000000 pixels")


async def test_too_many_images_in_one_request_is_413(classifier_dir, photos) -> None:
    image = encode(photos["coffee"][:32, :32])
    async with serving([classifier_dir], max_images_per_request=2) as client:
        response = await client.post("/classify", files=upload(image, image, image))
    assert_error(response, 413, "payload_too_large", detail_has="3 images")


async def test_unsupported_content_type_is_415(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.post(
            "/classify", content=b"hello", headers={"content-type": "text/plain"}
        )
    assert_error(response, 415, "unsupported_media_type", detail_has="text/plain")


async def test_bytes_that_are_no_image_are_415(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.post("/classify", files=upload(b"%PDF-1.4 not an image"))
    assert_error(response, 415, "unsupported_media_type")


async def test_image_format_outside_the_supported_set_is_415(classifier_dir, photos) -> None:
    ppm = encode(Image.fromarray(photos["coffee"][:16, :16]), "PPM")
    async with serving([classifier_dir]) as client:
        response = await client.post("/classify", files=upload(ppm))
    assert_error(response, 415, "unsupported_media_type", detail_has="PPM")


@pytest.mark.parametrize(
    ("route", "params"),
    [
        ("/classify", {"top_k": 0}),
        ("/classify", {"top_k": "many"}),
        ("/detect", {"score_threshold": 1.5}),
    ],
)
async def test_bad_query_parameters_are_422(
    classifier_dir, detector_dir, photos, route: str, params: dict
) -> None:
    async with serving([classifier_dir, detector_dir]) as client:
        response = await client.post(route, params=params, files=upload(encode(photos["coffee"])))
    assert_error(response, 422, "invalid_parameters", detail_has=next(iter(params)))


async def test_multipart_without_a_file_field_is_422(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.post("/classify", files=[("image", ("a.png", b"x", "image/png"))])
    assert_error(response, 422, "invalid_parameters", detail_has="'file'")


async def test_unknown_model_is_404(classifier_dir, photos) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.post(
            "/classify", params={"model": "nope"}, files=upload(encode(photos["coffee"]))
        )
    assert_error(response, 404, "unknown_model", detail_has="tiny_cls")


async def test_model_of_another_task_is_404(classifier_dir, segmenter_dir, photos) -> None:
    async with serving([classifier_dir, segmenter_dir]) as client:
        response = await client.post(
            "/segment", params={"model": "tiny_cls"}, files=upload(encode(photos["coffee"]))
        )
    assert_error(response, 404, "unknown_model", detail_has="classify model")


async def test_route_without_a_loaded_model_of_its_task_is_404(classifier_dir, photos) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.post("/detect", files=upload(encode(photos["coffee"])))
    assert_error(response, 404, "unknown_model", detail_has="no detect model")


async def test_unknown_route_is_404_in_the_same_shape(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.get("/nowhere")
    assert_error(response, 404, "not_found")


async def test_image_beyond_the_aspect_ratio_limit_is_413_naming_the_limit(
    classifier_dir,
) -> None:
    async with serving([classifier_dir], max_aspect_ratio=10) as client:
        wide = await client.post("/classify", files=upload(png_claiming_size(2000, 100)))
        square = await client.post("/classify", files=upload(encode(np.zeros((60, 60, 3), "u1"))))
    assert_error(wide, 413, "payload_too_large", detail_has="--max-aspect-ratio")
    assert "2000x100" in wide.json()["detail"]
    assert square.status_code == 200


async def test_far_too_many_images_in_one_request_is_413_too(classifier_dir, photos) -> None:
    """Past the multipart parser's own file limit (one over ours) it stops reading: that
    is the same 413, not the parser's 400."""
    image = encode(photos["coffee"][:32, :32])
    async with serving([classifier_dir], max_images_per_request=2) as client:
        response = await client.post("/classify", files=upload(*[image] * 5))
    assert_error(response, 413, "payload_too_large", detail_has="more than 2 images")


async def test_v2_body_over_the_declared_upload_limit_is_413_in_the_kserve_shape(
    classifier_dir,
) -> None:
    async with serving([classifier_dir], max_upload_mb=0.01) as client:
        response = await client.post(
            "/v2/models/tiny_cls/infer",
            content=b"{" + b" " * 20_000 + b"}",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 413
    assert set(response.json()) == {"error"}
    assert response.json()["error"].startswith("payload_too_large: request body over")
