"""A segmenter's last step, side by side: the class mask at the uploaded image's size from
the tiles' averaged logits (mmseg: resize the logits bilinearly to the image, argmax).

    python bench/segment_finish.py [--rounds 3] [--largest-pixels N]

`every pixel` blends every class at every output pixel (the columns resized first, then
the rows a band at a time: the service's way until 2026-12-04); `boundaries`
(service.imaging.resized_argmax) takes the class shared by an output pixel's four source
pixels without blending and blends only the pixels along class boundaries. Cases: the
demo segmenter's logits for a 384x256 photograph, and class-region logits (a coarse
random field resized up, as a segmenter's are smooth) of ADE20K's 150 classes at 512x683
resized to a 768x1024 image and to a 3024x4032 phone photo, and Cityscapes' 19 at
1024x2048. Prints, per case, the median milliseconds over --rounds alternating rounds,
the peak memory each takes (tracemalloc, a separate run), the share of output pixels
blended, the speed-up, and whether the two masks are identical (exit 1 if not).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from service import imaging


def every_pixel(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """argmax of the logits resized at every pixel: columns first, rows a band at a time."""
    channels, in_h, in_w = logits.shape
    x0, x1, wx = imaging._linear_taps(in_w, width)
    columns = logits[:, :, x0] * (1 - wx) + logits[:, :, x1] * wx
    y0, y1, wy = imaging._linear_taps(in_h, height)
    rows_per_band = max(1, imaging._LOGIT_CHUNK_ELEMENTS // max(1, channels * width))
    mask = np.empty((height, width), dtype=np.uint8 if channels <= 256 else np.uint16)
    for start in range(0, height, rows_per_band):
        stop = min(start + rows_per_band, height)
        w = wy[start:stop][None, :, None]
        band = columns[:, y0[start:stop]] * (1 - w) + columns[:, y1[start:stop]] * w
        mask[start:stop] = band.argmax(axis=0)
    return mask


def class_regions(channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth logits, each class high over regions: a 16x22 random field resized up."""
    coarse = np.random.default_rng(seed).normal(size=(channels, 16, 22)).astype(np.float32) * 4
    return imaging.resize_bilinear(coarse, height, width).astype(np.float32)


def demo_logits() -> tuple[np.ndarray, int, int]:
    """The demo segmenter's averaged tile logits for loadgen's 384x256 photograph."""
    sys.path.insert(0, "bench")
    from loadgen import test_image

    from hornet_bundle import load_bundle
    from service.engines import create_engine
    from service.pipelines import pipeline_for
    from service.settings import Settings

    bundle = load_bundle("service/demo_bundles/shapes_segment")
    pipeline, engine = pipeline_for(bundle.manifest), create_engine(bundle, Settings())
    prepared = pipeline.prepare(imaging.decode_image(test_image((384, 256)), 10**8))
    logits = pipeline.averaged_logits(prepared, pipeline.run_batch(engine, prepared.items))
    return logits, prepared.height, prepared.width


def peak_mib(function: Callable, *args) -> float:
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def blended_share(logits: np.ndarray, height: int, width: int) -> float:
    """The share of output pixels `resized_argmax` blends (their four source pixels'
    classes differ)."""
    x0, x1, _ = imaging._linear_taps(logits.shape[2], width)
    y0, y1, _ = imaging._linear_taps(logits.shape[1], height)
    return float(imaging.corner_classes(logits.argmax(0), (y0, y1), (x0, x1))[1].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--largest-pixels", type=int, default=0, help="skip cases whose mask is larger (0: none)"
    )
    args = parser.parse_args(argv)
    region = class_regions(150, 512, 683)
    cases = {
        "demo segmenter, 384x256 photo": demo_logits(),
        "ADE20K 150 classes, 768x1024": (region, 768, 1024),
        "ADE20K 150 classes, 3024x4032": (region, 3024, 4032),
        "Cityscapes 19 classes, 1024x2048": (class_regions(19, 1024, 2048), 1024, 2048),
    }
    ways = {"every pixel": every_pixel, "boundaries": imaging.resized_argmax}
    print(f"{'case':34s} {'blended':>8s} {'every pixel ms':>15s} {'boundaries ms':>14s} "
          f"{'speed-up':>9s} {'peak MiB':>14s}  same")  # fmt: skip
    status = 0
    for name, (logits, height, width) in cases.items():
        if args.largest_pixels and height * width > args.largest_pixels:
            continue
        times: dict[str, list[float]] = {way: [] for way in ways}
        masks = {}
        for _ in range(args.rounds):
            for way, function in ways.items():
                started = time.perf_counter()
                masks[way] = function(logits, height, width)
                times[way].append((time.perf_counter() - started) * 1000)
        peaks = [peak_mib(function, logits, height, width) for function in ways.values()]
        every, bounded = (float(np.median(times[way])) for way in ways)
        same = np.array_equal(masks["every pixel"], masks["boundaries"])
        status |= not same
        print(f"{name:34s} {blended_share(logits, height, width):>8.1%} {every:>15.1f} "
              f"{bounded:>14.1f} {every / bounded:>8.1f}x {peaks[0]:>6.0f} / {peaks[1]:<5.0f}  "
              f"{'yes' if same else 'NO'}")  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
