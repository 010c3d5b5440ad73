"""Pillow's process-wide behaviour in a real server (service.imaging.configure_decoding):

- a client's malformed EXIF makes Pillow warn (in plain text, from the decoding thread);
  the server used to write those warnings to standard error beside its JSON log lines,
  two a request, as often as a client cared to send the file: now nothing but JSON
  lines is written, and the image is still answered; likewise libtiff, which printed
  its own messages about a malformed compressed TIFF from the decoding thread;
- --max-pixels is the only pixel limit: Pillow's own (a warning turned error past 89.5
  megapixels, an error past 179) refused images --max-pixels allowed, with Pillow's
  message instead of the server's.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.imaging import quiet_libtiff
from service.testing import running_server
from tests.helpers.images import tiff_file
from tests.helpers.logs import json_lines


def _corrupt_exif_jpeg() -> bytes:
    """A small JPEG whose EXIF block is cut short inside a tag's value (Pillow warns
    "Truncated File Read" reading it, and decodes the image)."""
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "Camera maker name long"
    exif[0x0110] = "Camera model"
    out = io.BytesIO()
    array = np.full((16, 16, 3), 90, np.uint8)
    Image.fromarray(array).save(out, "JPEG", exif=b"Exif\x00\x00" + exif.tobytes()[:-10])
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _black_png(width: int, height: int) -> bytes:
    """An RGB PNG of `width` x `height` whose pixel data stops after two black rows (Pillow
    decodes the rest as black): a few hundred bytes whatever its size."""
    rows = zlib.compress(b"\0" * (3 * width + 1) * 2)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", rows)
        + _chunk(b"IEND", b"")
    )


def _post(url: str, data: bytes, content_type: str) -> httpx.Response:
    return httpx.post(
        f"{url}/classify", content=data, headers={"content-type": content_type}, timeout=60
    )


def test_pillows_warnings_on_a_clients_file_are_not_written(
    classifier_dir: Path, tmp_path: Path
) -> None:
    data = _corrupt_exif_jpeg()
    log = tmp_path / "server.log"
    with running_server(["--model-dir", str(classifier_dir)], log_path=log) as server:
        for _ in range(3):
            answer = _post(server.url, data, "image/jpeg")
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"][0]["top_k"]
    json_lines(log)  # every line of the log is JSON: no warning in plain text
    assert "Truncated File Read" not in log.read_text()


def _corrupt_deflate_tiff() -> bytes:
    """A zlib-compressed greyscale TIFF whose stream's checksum is wrong: Pillow decodes
    it with libtiff, which prints "ZIPDecode: Decoding error ..., incorrect data check"
    to standard error itself by default, and Pillow raises."""
    grey = (np.arange(24 * 32).reshape(24, 32) % 256).astype(np.uint8)
    data = bytearray(tiff_file(grey, deflate=True))
    end = 8 + len(zlib.compress(grey.tobytes()))  # the one strip follows the 8-byte header
    data[end - 4 : end] = bytes(4)  # its Adler-32
    return bytes(data)


def test_libtiffs_messages_on_a_clients_file_are_not_written(
    classifier_dir: Path, tmp_path: Path
) -> None:
    assert quiet_libtiff() >= 1  # the libtiff Pillow loaded is found here
    log = tmp_path / "server.log"
    with running_server(["--model-dir", str(classifier_dir)], log_path=log) as server:
        for _ in range(3):
            answer = _post(server.url, _corrupt_deflate_tiff(), "image/tiff")
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"] == "bad_image"
    json_lines(log)  # no line of libtiff's, in plain text
    assert "ZIPDecode" not in log.read_text()


def test_max_pixels_is_the_only_pixel_limit(classifier_dir: Path, tmp_path: Path) -> None:
    # 179.6 megapixels, past Pillow's error limit (2 x 89,478,485)
    over_pillows = _black_png(13_400, 13_400)
    # 90.3 megapixels, past the limit where Pillow warns (the server made that an error)
    over_warning = _black_png(9_500, 9_500)
    flags = ["--model-dir", str(classifier_dir), "--decode-threads", "1"]
    with running_server(flags, log_path=tmp_path / "default.log") as server:
        answer = _post(server.url, over_pillows, "image/png")
        assert answer.status_code == 413, answer.text
        # the server's own refusal, naming its setting, not Pillow's
        assert "the limit is 40000000 (--max-pixels)" in answer.json()["detail"]
    flags += ["--max-pixels", "200000000"]
    with running_server(
        flags, log_path=tmp_path / "raised.log", memory_limit_bytes=6 << 30
    ) as server:
        for image in (over_warning, over_pillows):
            answer = _post(server.url, image, "image/png")
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"][0]["top_k"][0]["score"] > 0
        answer = _post(server.url, _black_png(15_000, 14_000), "image/png")
        assert answer.status_code == 413, answer.text
        assert "the limit is 200000000 (--max-pixels)" in answer.json()["detail"]
