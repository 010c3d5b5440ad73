"""A decoded photo to numpy: `np.asarray` (through Image.tobytes) against
`hornet_bundle.preprocess.pixels` (one copy), side by side.

    python bench/pixels.py [--image PHOTO.jpg] [--model-dir DIR] [--rounds 6]

Runs, alternating within each round: the conversion alone, and what a request's
decoding thread does for a dense model that resizes with OpenCV (decode, then the
pipeline's `prepare`, which converts the whole decoded image; default: the packaged demo
detector) with each conversion. Prints median milliseconds, the speed-up (median of the
rounds' ratios, and their range) and the page faults per call. The server's allocator
settings are applied first (glibc's 1 MiB mmap threshold, Pillow's block cache), as in
`hornet serve`. The default image is the 4032x3024 photo of bench/reduced_decode.py.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hornet_bundle.preprocess as preprocess  # noqa: E402
from hornet_bundle import load_bundle  # noqa: E402
from service import memory  # noqa: E402
from service.imaging import decode_image  # noqa: E402
from service.pipelines import pipeline_for  # noqa: E402
from service.settings import DEMO_BUNDLES_DIR, Settings  # noqa: E402
from tests.helpers.images import phone_photo  # noqa: E402

CONVERSIONS = {
    "np.asarray": lambda image: np.asarray(image, dtype=np.uint8),
    "pixels": preprocess.pixels,
}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _measure(rounds: int, work) -> dict[str, tuple[list[float], list[int]]]:
    """Per conversion: each round's seconds and page faults for `work(conversion)`."""
    results: dict[str, tuple[list[float], list[int]]] = {n: ([], []) for n in CONVERSIONS}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, convert in CONVERSIONS.items():
            faults, start = _faults(), time.perf_counter()
            work(convert)
            seconds, faulted = time.perf_counter() - start, _faults() - faults
            results[name][0].append(seconds)
            results[name][1].append(faulted)
    return {name: (times[1:], faults[1:]) for name, (times, faults) in results.items()}


def _report(label: str, results: dict[str, tuple[list[float], list[int]]]) -> None:
    (old_times, old_faults), (new_times, new_faults) = results.values()
    ratios = sorted(o / n for o, n in zip(old_times, new_times, strict=True))
    print(
        f"{label}: np.asarray {statistics.median(old_times) * 1000:.1f} ms "
        f"({statistics.median(old_faults):.0f} page faults), pixels "
        f"{statistics.median(new_times) * 1000:.1f} ms ({statistics.median(new_faults):.0f}); "
        f"speed-up {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, help="a photo (default: the phone-sized one)")
    parser.add_argument("--model-dir", type=Path, default=DEMO_BUNDLES_DIR / "shapes_detect")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    if args.image:
        data = args.image.read_bytes()
    else:
        from skimage import data as images

        data = phone_photo(images.astronaut())
    memory.configure_allocator()
    memory.configure_image_cache(Settings().image_cache_size_mib)
    decoded = decode_image(data, 10**9)
    print(f"image: {decoded.image.size}, {len(data) / 1e6:.1f} MB")
    _report("conversion", _measure(args.rounds, lambda convert: convert(decoded.image)))
    pipeline = pipeline_for(load_bundle(args.model_dir).manifest)

    def decode_and_prepare(convert) -> None:
        preprocess.pixels = convert  # what the pipeline's fit_image calls
        try:
            pipeline.prepare(decode_image(data, 10**9))
        finally:
            preprocess.pixels = CONVERSIONS["pixels"]

    _report(f"{args.model_dir.name} decode + prepare", _measure(args.rounds, decode_and_prepare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
