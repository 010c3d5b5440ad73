"""Every image mode costs the server about what an RGBA upload of the same size does
(progressive JPEGs up to 1.6 times: libjpeg's coefficient buffer).

P8's bound is one decoded image per decoding thread. A 16-bit greyscale PNG compresses
to almost nothing (12 megapixels of a gradient: tens of KB) and used to be scaled to 8
bits with numpy temporaries of the whole image in int64 and float64: 26 bytes per pixel
against an RGB upload's 4 and an RGBA one's 8, so a few such uploads could take a
gigabyte each. A real server (one decoding thread, no image cache, so each upload's
cost shows alone) answers each mode, and its peak resident memory over the settled
memory before is compared with what Pillow's own RGBA -> RGB conversion costs on the
same server.
"""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import DEMO_BUNDLES_DIR
from service.testing import running_server
from tests.helpers.memory import memory_of, reset_peak

MIB = 1 << 20
WIDTH, HEIGHT = 4000, 3000
# What a mode may cost over RGBA's own conversion: rounding between runs, the upload.
OVER_RGBA = 1.25
SLACK = 24 * MIB
# A progressive JPEG is decoded through libjpeg's whole-image coefficient buffer, two
# bytes per sample (6 per pixel in 4:4:4 RGB, 8 in CMYK) before the pixels exist; no
# setting of the decoder avoids it.
PROGRESSIVE_OVER_RGBA = 1.6
PROGRESSIVE = ("RGB progressive JPEG", "CMYK progressive JPEG")


def _upload(mode: str) -> tuple[bytes, str]:
    """A WIDTH x HEIGHT image in `mode`, encoded small (smooth content compresses)."""
    ramp = np.arange(WIDTH, dtype=np.uint32)[None, :].repeat(HEIGHT, axis=0)
    buffer = io.BytesIO()
    if mode == "I;16":
        image = Image.fromarray((ramp * 16 % 65536).astype(np.uint16))
        fmt, options = "PNG", {}
    elif mode == "I":
        image = Image.fromarray((ramp * 16).astype(np.int32))
        fmt, options = "TIFF", {"compression": "tiff_deflate"}
    elif mode == "F":
        image = Image.fromarray((ramp % 300).astype(np.float32))
        fmt, options = "TIFF", {"compression": "tiff_deflate"}
    else:
        grey = Image.fromarray((ramp % 256).astype(np.uint8))
        image = Image.merge("RGB", (grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey))
        image = image.convert(mode.split()[0])
        if mode in PROGRESSIVE:  # 4:4:4, the largest coefficient buffer for its components
            fmt, options = "JPEG", {"quality": 90, "progressive": True, "subsampling": 0}
        elif mode == "CMYK":
            fmt, options = "TIFF", {"compression": "tiff_deflate"}
        else:
            fmt, options = "PNG", {}
    assert image.mode == mode.split()[0], image.mode
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue(), f"image/{fmt.lower()}"


def _settle(pid: int, timeout_s: float = 10.0) -> int:
    """Resident memory once it stops falling (the releaser trims within a second)."""
    give_up_at = time.monotonic() + timeout_s
    last = memory_of(pid)["VmRSS"]
    while time.monotonic() < give_up_at:
        time.sleep(0.6)
        now = memory_of(pid)["VmRSS"]
        if now >= last - MIB:
            return now
        last = now
    return last


def test_no_image_mode_costs_more_than_rgba(tmp_path) -> None:
    modes = ["RGBA", "RGB", "I;16", "I", "F", "CMYK", "LA", "P", *PROGRESSIVE]
    uploads = {mode: _upload(mode) for mode in modes}
    flags = ["--model-dir", str(DEMO_BUNDLES_DIR / "shapes_classify")]
    flags += ["--decode-threads", "1", "--engine-threads", "1", "--image-cache-mib", "0"]
    server = running_server(flags, log_path=tmp_path / "server.log", memory_limit_bytes=8 << 30)
    costs = {}
    with server as (url, process, _):
        with httpx.Client(timeout=120.0) as client:

            def classify(data: bytes, content_type: str) -> None:
                response = client.post(
                    f"{url}/classify", content=data, headers={"Content-Type": content_type}
                )
                assert response.status_code == 200, response.text[:300]

            classify(*uploads["RGBA"])  # warm every code path once
            for mode in modes:
                before = _settle(process.pid)
                reset_peak(process.pid)
                classify(*uploads[mode])
                costs[mode] = memory_of(process.pid)["VmHWM"] - before
        assert process.poll() is None
    pixels = WIDTH * HEIGHT
    print(
        "peak over settled, bytes per pixel: "
        + ", ".join(f"{mode} {cost / pixels:.1f}" for mode, cost in costs.items())
        + " (uploads: "
        + ", ".join(f"{mode} {len(uploads[mode][0]) // 1024} KiB" for mode in modes)
        + ")"
    )
    over = {
        mode: cost
        for mode, cost in costs.items()
        if cost
        > (PROGRESSIVE_OVER_RGBA if mode in PROGRESSIVE else OVER_RGBA) * costs["RGBA"] + SLACK
    }
    assert not over, (
        f"modes costing more than their bound ({OVER_RGBA} x RGBA's {costs['RGBA'] / MIB:.0f} "
        f"MiB, progressive JPEGs {PROGRESSIVE_OVER_RGBA} x): "
        + ", ".join(f"{mode} {cost / MIB:.0f} MiB" for mode, cost in over.items())
    )
    # and RGBA itself is what one decoded image and its RGB copy take (4 + 4 bytes)
    assert costs["RGBA"] < 12 * pixels, costs["RGBA"] / pixels


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_uploads_are_small_enough_to_be_a_threat(mode: str) -> None:
    """The point of the test above: these modes arrive well within --max-upload-mb's
    default (20 MB) and decode to far more than they weigh."""
    data, _ = _upload(mode)
    assert len(data) < 4 * MIB, len(data)
