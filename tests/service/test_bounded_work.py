"""Work and memory per request are bounded by the model's input, not by the upload.

A real `hornet serve` process on the demo models (address space capped, so a regression
fails the test instead of the machine): images of any aspect ratio within --max-pixels
get a correct 200 on every route, and a battery of 36-megapixel photos leaves the
server's peak resident memory under idle + 3 GB and its memory back near idle after.
"""

from __future__ import annotations

import io
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from hornet_bundle import Preprocess
from service import imaging
from service.testing import running_server
from tests.helpers.images import (
    after_soi,
    exif_block,
    gif_comment,
    gif_with,
    many_scan_jpeg,
    photo_36mpx,
    png_chunk,
    png_with_chunks,
    tiff_file,
)
from tests.helpers.memory import memory_of

GIB = 1 << 30
MIB = 1 << 20
EXTREME_SHAPES = [(40000, 1), (1, 40000), (20000, 2), (2, 20000), (9000, 1)]
ROUTES = ("classify", "segment", "detect")
# The demo models (no --model-dir); batches of up to 4 of the large photos at once.
SERVER_FLAGS = ["--max-batch-size", "4", "--engine-threads", "1", "--max-delay-ms", "5"]
# The documented bound (docs/limits.md): peak resident memory over idle under this
# battery, and how close to idle the server must come back once it is over.
PEAK_OVER_IDLE = 3 * GIB
SETTLED_OVER_IDLE = 200 * MIB


def _png(width: int, height: int) -> bytes:
    values = np.linspace(0, 255, width * height, dtype=np.float32).reshape(height, width)
    rgb = np.stack([values, 255 - values, np.full_like(values, 90)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _post(base_url: str, route: str, data: bytes, content_type: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/{route}",
        content=data,
        headers={"Content-Type": content_type},
        timeout=300.0,
    )


def _check_answer(route: str, response: httpx.Response, width: int, height: int) -> None:
    assert response.status_code == 200, (route, width, height, response.text[:300])
    (result,) = response.json()["results"]
    if route == "classify":
        scores = [entry["score"] for entry in result["top_k"]]
        assert len(scores) == 3 and sum(scores) == pytest.approx(1.0, abs=1e-6)
        return
    assert (result["width"], result["height"]) == (width, height)
    if route == "segment":
        mask = Image.open(io.BytesIO(__import__("base64").b64decode(result["mask_png"])))
        assert mask.size == (width, height)
        assert sum(c["fraction"] for c in result["classes"]) == pytest.approx(1.0)
        return
    for detection in result["detections"]:
        x1, y1, x2, y2 = detection["box"]
        assert -1 <= x1 <= x2 <= width + 1 and -1 <= y1 <= y2 <= height + 1
        rle = detection["mask"]
        assert rle["size"] == [height, width]
        decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert decoded.shape == (height, width)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("bounded") / "server.log"
    with running_server(SERVER_FLAGS, log_path=log_path, memory_limit_bytes=16 * GIB) as server:
        yield server.url, server.process


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("width", "height"), EXTREME_SHAPES, ids=lambda v: str(v))
def test_extreme_aspect_ratios_get_a_correct_answer(demo_server, route, width, height) -> None:
    base_url, process = demo_server
    response = _post(base_url, route, _png(width, height), "image/png")
    _check_answer(route, response, width, height)
    assert process.poll() is None


@pytest.mark.parametrize("route", ROUTES)
def test_a_jpeg_of_thousands_of_scans_is_refused_and_an_ordinary_one_answered(
    demo_server, route
) -> None:
    """Each scan of a progressive JPEG is a decoding pass over the whole image: 40 KB
    of repeated scans would hold a decoding thread for seconds (megabytes of them for
    minutes). Refused with 413 before decoding; the same picture's own 10 scans pass."""
    base_url, process = demo_server
    plain, bomb = many_scan_jpeg(2000, 1500, 1000)
    assert len(bomb) < 64 * 1024
    refused = _post(base_url, route, bomb, "image/jpeg")
    assert refused.status_code == 413, refused.text[:300]
    body = refused.json()
    assert body["error"] == "payload_too_large" and "--max-jpeg-scans" in body["detail"]
    _check_answer(route, _post(base_url, route, plain, "image/jpeg"), 2000, 1500)
    assert process.poll() is None


def test_files_whose_structure_costs_more_than_their_pixels_are_refused(demo_server) -> None:
    """Structure Pillow reads in Python, one piece at a time, each file seconds of CPU or
    hundreds of MB before these checks: a JPEG of 100,000 empty APP segments (400 KB), a
    PNG of 100,000 empty chunks (1.2 MB), a GIF comment of 500,000 1-byte sub-blocks (1
    MB), an uncompressed TIFF of 50,176 1x1 tiles, a 224x224 TIFF in one 4096x4096
    deflate tile, a BigTIFF directory of 100,000 entries, a PNG whose EXIF holds 2 MB of
    rationals besides its orientation: 413 at once. A PPM (a format Pillow reads and the
    service does not): 415. A TIFF whose strip offset is a float (Pillow: TypeError):
    400. The server answers on."""
    base_url, process = demo_server
    ordinary = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 90, 90)).save(ordinary, "JPEG")
    jpeg = ordinary.getvalue()
    grey = np.full((224, 224), 90, np.uint8)
    unknown_tags = tuple((50000 + i % 5000, 3, 1, b"\0\0") for i in range(100_000))
    exif = exif_block(
        [(0x0112, 3, 1, b"\x06\0"), (282, 5, 250_000, b"\x48\0\0\0\x01\0\0\0" * 250_000)]
    )
    cases = [
        (after_soi(jpeg, b"\xff\xe5\x00\x02" * 100_000), "image/jpeg", 413, "marker segments"),
        (png_with_chunks(100_000, b"abCd"), "image/png", 413, "chunks"),
        (gif_with(gif_comment([b"x"] * 500_000)), "image/gif", 413, "extension blocks"),
        (tiff_file(grey, tile=(1, 1)), "image/tiff", 413, "strips or tiles"),
        (tiff_file(grey, tile=(4096, 4096), deflate=True), "image/tiff", 413, "declares tiles"),
        (tiff_file(grey, big=True, extra_entries=unknown_tags), "image/tiff", 413, "entries"),
        (
            _png(64, 48)[:33] + png_chunk(b"eXIf", exif) + _png(64, 48)[33:],
            "image/png",
            413,
            "numeric values",
        ),
        (
            b"P6\n64 48\n255\n" + bytes(64 * 48 * 3),
            "image/png",
            415,
            "first bytes are PPM's",
        ),
    ]
    float_offset = tiff_file(grey, extra_entries=())  # its strip offset made a FLOAT
    entry = float_offset.index(struct.pack("<HHI", 273, 4, 1))
    float_offset = (
        float_offset[:entry] + struct.pack("<HHIf", 273, 11, 1, 8.0) + float_offset[entry + 12 :]
    )
    cases.append((float_offset, "image/tiff", 400, "undecodable or truncated TIFF"))
    for data, content_type, status, message in cases:
        refused = _post(base_url, "classify", data, content_type)
        assert refused.status_code == status, (message, refused.text[:300])
        assert message in refused.json()["detail"]
    _check_answer("classify", _post(base_url, "classify", jpeg, "image/jpeg"), 64, 48)
    assert process.poll() is None


def test_crop_then_resize_is_close_to_the_center_crop_of_the_full_resize(monkeypatch) -> None:
    """Beyond EXACT_RESIZE_CROPS only the crop is resampled; compare it with the full
    resize-then-crop (torchvision's order) on shapes where the full resize is cheap. On
    uniform noise (the worst case: PIL's box resize may round its two passes in the
    other order) pixels differ by under one grey level on average."""
    preprocess = Preprocess(
        resize_mode="shorter_side_center_crop",
        input_size=(64, 64),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    rng = np.random.default_rng(0)
    for width, height in [(3000, 2), (2, 3000), (1500, 7), (640, 480), (33, 1000)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        monkeypatch.setattr("hornet_bundle.preprocess.EXACT_RESIZE_CROPS", 10**9)
        whole = imaging.classification_input(image, preprocess).astype(int)
        monkeypatch.setattr("hornet_bundle.preprocess.EXACT_RESIZE_CROPS", 0)
        cropped = imaging.classification_input(image, preprocess).astype(int)
        assert cropped.shape == whole.shape == (64, 64, 3)
        assert np.abs(cropped - whole).mean() < 1.0, (width, height)


def test_memory_stays_bounded_under_a_battery_of_large_photos(tmp_path: Path) -> None:
    photo = photo_36mpx()
    extremes = [_png(w, h) for w, h in EXTREME_SHAPES]
    log_path = tmp_path / "server.log"
    server = running_server(SERVER_FLAGS, log_path=log_path, memory_limit_bytes=16 * GIB)
    with server as (base_url, process, _):
        for route in ROUTES:  # warm every route's code paths with an ordinary image
            _check_answer(route, _post(base_url, route, _png(640, 480), "image/png"), 640, 480)
        idle = memory_of(process.pid)["VmRSS"]
        timings = {}
        with ThreadPoolExecutor(max_workers=4) as pool:
            for route in ROUTES:
                started = time.perf_counter()
                answers = list(
                    pool.map(_post, [base_url] * 4, [route] * 4, [photo] * 4, ["image/jpeg"] * 4)
                )
                timings[route] = time.perf_counter() - started
                for response in answers:
                    _check_answer(route, response, 6000, 6000)
                for data, (width, height) in zip(extremes, EXTREME_SHAPES, strict=True):
                    _check_answer(route, _post(base_url, route, data, "image/png"), width, height)
        peak = memory_of(process.pid)["VmHWM"]
        settled = _wait_for_rss_below(process.pid, idle + SETTLED_OVER_IDLE, timeout_s=10.0)
        assert process.poll() is None
    print(
        f"idle {idle / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB (+{(peak - idle) / MIB:.0f}), "
        f"after {settled / MIB:.0f} MiB (+{(settled - idle) / MIB:.0f}); 4 x 36 Mpx per "
        f"route: {', '.join(f'{r} {s:.1f} s' for r, s in timings.items())}"
    )
    assert peak - idle < PEAK_OVER_IDLE
    assert settled - idle < SETTLED_OVER_IDLE


def _wait_for_rss_below(pid: int, limit: int, timeout_s: float) -> int:
    """The server's RSS once under `limit`, or its last reading after `timeout_s`
    (memory is handed back to the system after each request's work, not instantly)."""
    give_up_at = time.monotonic() + timeout_s
    while True:
        rss = memory_of(pid)["VmRSS"]
        if rss < limit or time.monotonic() > give_up_at:
            return rss
        time.sleep(0.2)
