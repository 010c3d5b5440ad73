"""For tests that make requests queue in a real server (the slow classifier,
bundles.write_slow_classifier): a metric read from /metrics, a wait for one to grow, and
the photograph-sized JPEG they send."""

from __future__ import annotations

import time

import httpx
import numpy as np

from tests.helpers.images import encode


def metric(url: str, sample: str, timeout_s: float = 30.0) -> float:
    """The value of the server's `sample` (a name with its labels, as /metrics writes
    them: 'hornet_queue_depth{model="slow_cls"}'); 0 while it has none."""
    prefix = f"{sample} "
    for line in httpx.get(f"{url}/metrics", timeout=timeout_s).text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


def wait_for_metric(url: str, sample: str, at_least: float, timeout_s: float = 30.0) -> float:
    """Its value once `sample` is at least `at_least`; an AssertionError past `timeout_s`."""
    give_up_at = time.monotonic() + timeout_s
    while (value := metric(url, sample)) < at_least:
        assert time.monotonic() < give_up_at, f"{sample} stayed at {value}, under {at_least}"
        time.sleep(0.005)
    return value


def queued_photo(seed: int = 5) -> bytes:
    """A 320x240 JPEG of noise: decoded in a few milliseconds, then it waits its turn."""
    pixels = np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return encode(pixels, "JPEG")
