"""A request's images are handed to the decoding threads a few at a time (at most one per
thread waiting or being decoded), against a real server process: once one fails, the
request's deadline passes or its client goes, the rest are never decoded, and a later
request's image takes its turn between a large request's images instead of after all of
them.

Before, every image of a request was queued at once and decoded whatever became of the
request: one undecodable image and 30 flat 36-megapixel PNGs (3.6 MB) were answered 400
in 0.12 s and left 4 s of decoding behind them, ahead of every later request's images.
The flat PNG stands in for any image that is cheap to send and dear to decode; each of
these takes a decoding thread about 0.15 s.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.testing import RunningServer, running_server
from tests.helpers.queueing import metric, queued_photo, wait_for_metric
from tests.helpers.raw_http import connect, send

THREADS = 2
DEAR = 30  # dear images in a request
DECODED = 'hornet_decode_seconds_count{model="tiny_cls"}'


@pytest.fixture(scope="module")
def flat_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6000, 6000), (120, 30, 200)).save(out, "PNG", compress_level=9)
    assert len(out.getvalue()) < 200_000  # cheap to send
    return out.getvalue()


@contextlib.contextmanager
def _serve(classifier_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    flags = ["--model-dir", str(classifier_dir), "--decode-threads", str(THREADS)]
    flags += ["--max-images-per-request", "64", "--max-upload-mb", "20"]
    with running_server(
        flags, log_path=tmp_path / "server.log", memory_limit_bytes=6 << 30
    ) as server:
        yield server


@pytest.fixture
def server(classifier_dir: Path, tmp_path: Path) -> Iterator[RunningServer]:
    with _serve(classifier_dir, tmp_path) as running:
        yield running


def _files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]


def _settled(url: str) -> float:
    """The decoded count once it has stopped growing (the jobs already begun finish)."""
    value = metric(url, DECODED)
    while True:
        time.sleep(0.5)
        now = metric(url, DECODED)
        if now == value:
            return now
        value = now


def test_after_a_bad_image_the_rest_are_never_decoded(server, flat_png) -> None:
    bad = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    answer = httpx.post(f"{server.url}/classify", files=_files(bad, *[flat_png] * DEAR), timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == "bad_image"
    # the one handed over beside the bad image may have been decoded; none after it
    assert _settled(server.url) <= THREADS - 1
    # and the server is free: a photograph is then decoded next (counted by the decoded
    # total, not timed: a busy machine's clock says nothing about the 4.5 s of decoding
    # the 30 would take)
    photo = httpx.post(
        f"{server.url}/classify",
        content=queued_photo(),
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert photo.status_code == 200
    assert metric(server.url, DECODED) <= THREADS


def test_the_same_over_v2_with_an_encoded_image_tensor(server, flat_png) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    utils = pytest.importorskip("tritonclient.utils")
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    images = [b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, *[flat_png] * DEAR]
    tensor = httpclient.InferInput("encoded_image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    with pytest.raises(utils.InferenceServerException) as refused:
        client.infer("tiny_cls", [tensor])
    assert refused.value.status() == "400"
    assert _settled(server.url) <= THREADS - 1


def test_a_later_request_takes_its_turn_between_a_large_ones_images(server, flat_png) -> None:
    """The photograph, sent while the 30 dear images are being decoded, is decoded after
    at most the two of them each thread holds, not after all 30."""
    big = connect(server.url, timeout_s=60)
    body = httpx.Request("POST", f"{server.url}/classify", files=_files(*[flat_png] * DEAR))
    head = (
        f"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: {body.headers['content-type']}"
        f"\r\ncontent-length: {len(body.read())}\r\n\r\n"
    )
    try:
        assert send(big, head.encode() + body.read())
        wait_for_metric(server.url, DECODED, 1)
        photo = httpx.post(
            f"{server.url}/classify",
            content=queued_photo(),
            headers={"content-type": "image/jpeg"},
            timeout=60,
        )
        decoded_by_then = metric(server.url, DECODED)
        assert photo.status_code == 200
        assert decoded_by_then <= 2 + 2 * THREADS + 1, decoded_by_then  # itself included
    finally:
        big.close()


def test_a_passed_deadline_stops_the_decoding(server, flat_png) -> None:
    answer = httpx.post(
        f"{server.url}/classify?timeout_ms=400", files=_files(*[flat_png] * DEAR), timeout=60
    )
    assert answer.status_code == 504, answer.text
    assert f"deadline passed while its {DEAR} images were decoded" in answer.json()["detail"]
    assert _settled(server.url) < DEAR / 2


def test_a_departed_client_stops_the_decoding(server, flat_png) -> None:
    body = httpx.Request("POST", f"{server.url}/classify", files=_files(*[flat_png] * DEAR))
    content = body.read()
    client = connect(server.url)
    head = (
        f"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: {body.headers['content-type']}"
        f"\r\ncontent-length: {len(content)}\r\n\r\n"
    )
    assert send(client, head.encode() + content)
    wait_for_metric(server.url, DECODED, 1)
    client.close()
    # the request ends (counted 499) once a decoding job finishes after the close; only
    # then is the count settled: a job slowed by a busy machine can pause it for longer
    # than _settled's half second while the request still runs
    wait_for_metric(server.url, 'hornet_requests_total{route="/classify",status="499"}', 1)
    assert _settled(server.url) < DEAR / 2
