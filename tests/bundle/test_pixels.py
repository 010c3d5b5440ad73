"""hornet_bundle.preprocess.pixels: numpy's view of a PIL image, copied once.

Checked against numpy's own conversion (np.asarray, which goes through Image.tobytes)
value for value, and by the memory each takes at its peak (tracemalloc sees numpy's
buffers and Python's bytes alike)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from hornet_bundle import preprocess
from hornet_bundle.preprocess import pixels


def _noise(width: int, height: int, mode: str) -> Image.Image:
    rng = np.random.default_rng(width * 7919 + height)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (40000, 1), (1, 40000), (641, 479), (4032, 3024)])
def test_the_same_array_as_numpys_conversion(mode: str, size: tuple[int, int]) -> None:
    image = _noise(*size, mode)
    expected = np.asarray(image, dtype=np.uint8)
    got = pixels(image)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert got.flags.c_contiguous and got.flags.writeable
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "P", "1", "CMYK"])
def test_other_modes_are_converted_as_numpy_does(mode: str) -> None:
    image = _noise(37, 23, mode)
    np.testing.assert_array_equal(pixels(image), np.asarray(image, dtype=np.uint8))


def test_an_empty_image() -> None:
    assert pixels(Image.new("RGB", (0, 5))).shape == np.asarray(Image.new("RGB", (0, 5))).shape


def _peak(convert, image: Image.Image) -> int:
    tracemalloc.start()
    try:
        array = convert(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del array
    return peak


def test_one_copy_at_its_peak() -> None:
    """A 12-megapixel photo is 36 MiB as HWC uint8: numpy's conversion holds two copies
    at once (the 64 KiB pieces, then their join), pixels one and a piece."""
    image = _noise(4032, 3024, "RGB")
    size = 4032 * 3024 * 3
    ours = _peak(pixels, image)
    numpys = _peak(lambda im: np.asarray(im, dtype=np.uint8), image)
    print(f"peak: pixels {ours / size:.3f}x the image, np.asarray {numpys / size:.3f}x")
    assert numpys > 1.9 * size  # what the test would catch, measured the same way
    assert ours < 1.05 * size


def test_a_pillow_without_the_encoder_interface_gets_numpys_answer(monkeypatch) -> None:
    """The raw encoder is private Pillow API: where it is missing or changed, the
    answer is numpy's (and the peak test above fails, which is how we would notice)."""
    image = _noise(64, 48, "RGB")

    def changed_interface(image, flat) -> None:
        raise TypeError("encode() takes no arguments")

    monkeypatch.setattr(preprocess, "_encode_raw_into", changed_interface)
    np.testing.assert_array_equal(pixels(image), np.asarray(image))
