"""Detection memory is bounded by the model's input (issue P10, item 5).

A real `hornet serve` process (address space capped) serves a tiny Cascade Mask R-CNN
exported as the released detectors are: the host fits each upload to (1333, 800), the
engine answers 28x28 masks, the host pastes and RLE-encodes them one detection at a time.
At score threshold 0.05 it answers its full 100 detections, each mask pasted onto the
36-megapixel upload: one such photo raises the peak resident memory by under 1 GiB over
idle, four at once by under 3 GiB, and memory comes back to within 200 MiB of idle.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from pycocotools import mask as coco_mask

from service.testing import running_server
from tests.helpers.images import encode, photo_36mpx
from tests.helpers.memory import memory_of

GIB = 1 << 30
MIB = 1 << 20
ONE_PHOTO_OVER_IDLE = 1 * GIB
FOUR_PHOTOS_OVER_IDLE = 3 * GIB
SETTLED_OVER_IDLE = 200 * MIB


def _detect(url: str, data: bytes, content_type: str) -> list[dict]:
    response = httpx.post(
        f"{url}/detect",
        params={"score_threshold": 0.05},
        content=data,
        headers={"Content-Type": content_type},
        timeout=600.0,
    )
    assert response.status_code == 200, response.text[:300]
    (result,) = response.json()["results"]
    return result["detections"]


def _check(detections: list[dict], width: int, height: int) -> None:
    assert len(detections) == 100  # the model's full answer: every mask pasted
    for detection in detections:
        x1, y1, x2, y2 = detection["box"]
        # boxes are clipped to the fitted image, then scaled back (to float rounding)
        assert 0 <= x1 <= x2 <= width + 1e-3 and 0 <= y1 <= y2 <= height + 1e-3
        assert detection["mask"]["size"] == [height, width]
    rle = detections[0]["mask"]
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert decoded.shape == (height, width)


def _settle(pid: int, limit: int, timeout_s: float = 10.0) -> int:
    give_up_at = time.monotonic() + timeout_s
    while (rss := memory_of(pid)["VmRSS"]) >= limit and time.monotonic() < give_up_at:
        time.sleep(0.2)
    return rss


def test_36_megapixel_photos_to_detect_stay_within_the_bound(tiny_mmdet_bundle, tmp_path) -> None:
    photo = photo_36mpx()
    ordinary = encode(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    flags = ["--model-dir", str(tiny_mmdet_bundle), "--engine-threads", "1"]
    flags += ["--max-batch-size", "4", "--request-timeout-s", "600"]
    server = running_server(flags, log_path=tmp_path / "server.log", memory_limit_bytes=16 * GIB)
    with server as (url, process, _):
        _check(_detect(url, ordinary, "image/png"), 640, 480)  # warm every code path
        idle = memory_of(process.pid)["VmRSS"]
        _check(_detect(url, photo, "image/jpeg"), 6000, 6000)
        one_peak = memory_of(process.pid)["VmHWM"]
        one_settled = _settle(process.pid, idle + SETTLED_OVER_IDLE)
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(_detect, [url] * 4, [photo] * 4, ["image/jpeg"] * 4))
        for detections in answers:
            _check(detections, 6000, 6000)
        four_peak = memory_of(process.pid)["VmHWM"]
        four_settled = _settle(process.pid, idle + SETTLED_OVER_IDLE)
        assert process.poll() is None
    print(
        f"idle {idle / MIB:.0f} MiB; one 36 Mpx photo: peak +{(one_peak - idle) / MIB:.0f} MiB, "
        f"after +{(one_settled - idle) / MIB:.0f} MiB; four at once: peak "
        f"+{(four_peak - idle) / MIB:.0f} MiB, after +{(four_settled - idle) / MIB:.0f} MiB"
    )
    assert one_peak - idle < ONE_PHOTO_OVER_IDLE
    assert one_settled - idle < SETTLED_OVER_IDLE
    assert four_peak - idle < FOUR_PHOTOS_OVER_IDLE
    assert four_settled - idle < SETTLED_OVER_IDLE
