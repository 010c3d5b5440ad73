"""An upload's structure, checked before decoding (service.image_structure): a JPEG's
scans, marker segments and stray bytes and a PNG's chunks, counted as the stream has
them, and files past the limits refused before any pixel is decoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service import image_structure, imaging
from service.errors import PayloadTooLarge
from service.image_structure import (
    MAX_JPEG_SEGMENTS,
    MAX_JPEG_SKIPPED_BYTES,
    MAX_PNG_CHUNKS,
    check_structure,
    jpeg_structure,
    png_chunks,
)
from tests.helpers.images import (
    after_soi,
    encode,
    many_scan_jpeg,
    png_chunk,
    png_with_chunks,
)


def _small_jpeg() -> bytes:
    return encode(np.full((48, 64, 3), 90, np.uint8), "JPEG")


def test_jpeg_scans_are_counted_as_the_stream_has_them(photos) -> None:
    baseline = encode(photos["chelsea"], "JPEG")
    progressive = encode(photos["chelsea"], "JPEG", progressive=True)
    assert jpeg_structure(baseline, 500).scans == 1
    assert jpeg_structure(progressive, 500).scans == 10  # libjpeg's progressive script
    # marker bytes inside a segment (a comment here, an EXIF thumbnail in photos) are not scans
    commented = encode(photos["chelsea"], "JPEG", comment=b"\xff\xda" * 1000)
    assert commented.count(b"\xff\xda") == 1001 and jpeg_structure(commented, 500).scans == 1
    # an MPO's second picture is not decoded, so its scans do not count
    buffer = io.BytesIO()
    first, second = Image.fromarray(photos["chelsea"]), Image.fromarray(photos["coffee"])
    first.save(buffer, "MPO", save_all=True, append_images=[second], progressive=True)
    assert buffer.getvalue().count(b"\xff\xda") >= 20
    assert jpeg_structure(buffer.getvalue(), 500).scans == 10
    plain, bomb = many_scan_jpeg(64, 64, 1000)
    assert jpeg_structure(plain, 500).scans == 10
    assert jpeg_structure(bomb, 10**6).scans == 1010
    assert jpeg_structure(bomb, 500).scans == 501  # stops once over the limit


def test_ordinary_files_are_far_from_every_limit(photos) -> None:
    for data in (
        encode(photos["chelsea"], "JPEG"),
        encode(photos["chelsea"], "JPEG", progressive=True),
        encode(photos["chelsea"], "JPEG", exif=Image.Exif(), icc_profile=b"\0" * 200_000),
    ):
        found = jpeg_structure(data, 500)
        assert found.segments < 40 and found.skipped == 0, found
        check_structure(data)
    png = encode(photos["chelsea"], "PNG")
    assert png_chunks(png) < 10
    check_structure(png)


def test_jpeg_segments_and_stray_bytes_are_counted() -> None:
    jpeg = _small_jpeg()
    ordinary = jpeg_structure(jpeg, 500)
    flooded = after_soi(jpeg, b"\xff\xe5\x00\x02" * 100)  # 100 empty APP5 segments
    assert jpeg_structure(flooded, 500).segments == ordinary.segments + 100
    filled = after_soi(jpeg, b"\xff" * 1000)  # fill bytes before the first marker
    assert jpeg_structure(filled, 500).skipped == 1000
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    stray = jpeg[:app0_end] + b"junk" * 10 + b"\xff\x00" * 5 + jpeg[app0_end:]
    assert jpeg_structure(stray, 500).skipped == 50
    # and the files still decode as they did
    expected = np.asarray(imaging.decode_image(jpeg, max_pixels=10**6).image)
    for data in (flooded, filled, stray):
        got = np.asarray(imaging.decode_image(data, max_pixels=10**6).image)
        np.testing.assert_array_equal(got, expected)


def test_png_chunks_are_counted_up_to_iend() -> None:
    png = encode(np.full((48, 64, 3), 90, np.uint8), "PNG")
    ordinary = png_chunks(png)
    assert png_chunks(png_with_chunks(100, b"abCd")) == ordinary + 100
    assert png_chunks(png + png_chunk(b"abCd") * 100) == ordinary  # after IEND: not read


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        (
            "scans",
            lambda: many_scan_jpeg(256, 128, 600)[1],
            "more than 500 scans.*--max-jpeg-scans",
        ),
        (
            "segments",
            lambda: after_soi(_small_jpeg(), b"\xff\xe5\x00\x02" * MAX_JPEG_SEGMENTS),
            f"more than {MAX_JPEG_SEGMENTS} marker segments",
        ),
        (
            "fill bytes",
            lambda: after_soi(_small_jpeg(), b"\xff" * (MAX_JPEG_SKIPPED_BYTES + 2)),
            f"more than {MAX_JPEG_SKIPPED_BYTES} fill or stray bytes",
        ),
        (
            "stuffed bytes",
            lambda: after_soi(_small_jpeg(), b"\xff\xe5\x00\x02" + b"\xff\x00" * 40_000),
            "fill or stray bytes",
        ),
        (
            "png chunks",
            lambda: png_with_chunks(MAX_PNG_CHUNKS, b"abCd"),
            f"more than {MAX_PNG_CHUNKS} chunks",
        ),
        (
            "png image data chunks",
            lambda: png_with_chunks(MAX_PNG_CHUNKS, b"IDAT"),
            f"more than {MAX_PNG_CHUNKS} chunks",
        ),
    ],
)
def test_a_file_past_a_limit_is_refused_before_pillow_reads_it(
    monkeypatch, name, make, message
) -> None:
    data = make()
    monkeypatch.setattr(Image, "open", lambda *_a, **_k: pytest.fail("opened"))
    with pytest.raises(PayloadTooLarge, match=message):
        imaging.decode_image(data, max_pixels=10**6)


def test_the_scan_limit_is_the_setting(monkeypatch) -> None:
    plain, bomb = many_scan_jpeg(256, 128, 600)
    expected = np.asarray(imaging.decode_image(plain, max_pixels=10**6).image)
    with pytest.raises(PayloadTooLarge, match="more than 609 scans"):
        imaging.decode_image(bomb, max_pixels=10**6, max_jpeg_scans=609)
    # at the limit it decodes, and the repeated scans change no pixel here
    decoded = imaging.decode_image(bomb, max_pixels=10**6, max_jpeg_scans=610).image
    np.testing.assert_array_equal(np.asarray(decoded), expected)


def test_the_walk_stops_at_its_limits() -> None:
    """The check's own work is bounded by the limits, whatever the file's length."""
    endless = after_soi(_small_jpeg(), b"\xff\xe5\x00\x02" * (10 * MAX_JPEG_SEGMENTS))
    assert jpeg_structure(endless, 500).segments == MAX_JPEG_SEGMENTS + 1
    many = png_with_chunks(3 * MAX_PNG_CHUNKS, b"abCd")
    assert png_chunks(many) == MAX_PNG_CHUNKS + 1
    assert image_structure.DEFAULT_MAX_JPEG_SCANS == 500
