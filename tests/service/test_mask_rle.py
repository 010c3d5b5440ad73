"""A detection's RLE made from its mask window alone equals pycocotools' encoding of
the whole image (the reference: COCO's own encoder on the full-size mask)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask

from service.pipelines import _window_rle


def test_window_rle_equals_cocos_encoding_of_the_full_mask() -> None:
    rng = np.random.default_rng(1)
    for trial in range(600):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height + 1, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, width + 1, 2))
        if trial % 5 == 0:  # full-height windows: columns are neighbours
            y0, y1 = 0, height
        if trial % 7 == 0:
            x0, x1 = 0, width
        density = rng.choice([0.0, 1.0, rng.random()])
        window = np.asfortranarray(rng.random((y1 - y0, x1 - x0)) < density, dtype=np.uint8)
        full = np.zeros((height, width), np.uint8, order="F")
        full[y0:y1, x0:x1] = window
        expected = coco_mask.encode(full)["counts"].decode()
        got = _window_rle(window, (y0, y1), (x0, x1), (height, width))
        assert got.counts == expected, (height, width, y0, y1, x0, x1)
        assert got.size == (height, width)
