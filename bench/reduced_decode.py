"""What `--jpeg-reducing-gap` saves and what it changes, per model, on one JPEG.

    python bench/reduced_decode.py [--model-dir DIR ...] [--image PHOTO.jpg]
                                   [--gaps 0,1,2,4] [--rounds 5]

For each bundle (default: the packaged demo models) and each gap, runs what a request's
decoding thread runs (`decode_image` with the gap's draft, then the pipeline's
`prepare`), the gaps alternating within each round, and prints the size the JPEG was
decoded at, the median milliseconds, the speed-up over the full decode (median of the
rounds' ratios), and how far the prepared items (crop, tiles or fitted image) are from
the full decode's, in grey levels: mean and 99.9th percentile. The default image is a
4032x3024 phone-sized photograph made from scikit-image's astronaut (Lanczos upscale,
Gaussian grain of sigma 6, quality 90: `tests.helpers.images.phone_photo`, as the tests).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hornet_bundle import load_bundle  # noqa: E402
from service.imaging import decode_image, draft_size  # noqa: E402
from service.pipelines import pipeline_for  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.helpers.images import phone_photo  # noqa: E402


def default_photo() -> bytes:
    from skimage import data

    return phone_photo(data.astronaut())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", action="append", type=Path)
    parser.add_argument("--image", type=Path, help="a JPEG (default: the phone-sized photo)")
    parser.add_argument("--gaps", default="0,1,2,4", help="comma-separated; 0 = full decode")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    settings = Settings() if not args.model_dir else Settings(model_dir=args.model_dir)
    data = args.image.read_bytes() if args.image else default_photo()
    gaps = [float(g) for g in args.gaps.split(",")]
    if 0.0 not in gaps:
        gaps.insert(0, 0.0)
    print(f"image: {len(data) / 1e6:.1f} MB, {Image.open(io.BytesIO(data)).size}")
    header = f"{'model':<18} {'gap':>4} {'decoded at':>11} {'ms':>7} {'speed-up':>17}"
    print(f"{header} {'mean diff':>9} {'99.9%':>6}")
    for directory in settings.model_dir:
        pipeline = pipeline_for(load_bundle(directory).manifest)
        drafts = {g: draft_size(pipeline.first_resize, g) if g else None for g in gaps}
        seconds: dict[float, list[float]] = {g: [] for g in gaps}
        prepared = {}
        for _ in range(args.rounds):
            for gap in gaps:
                start = time.perf_counter()
                decoded = decode_image(data, settings.max_pixels, draft=drafts[gap])
                items = pipeline.prepare(decoded).items
                seconds[gap].append(time.perf_counter() - start)
                prepared[gap] = (decoded.image.size, items)
        exact = prepared[0.0][1]
        for gap in gaps:
            size, items = prepared[gap]
            ratios = [full / ours for full, ours in zip(seconds[0.0], seconds[gap], strict=True)]
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            diff = np.concatenate(
                [
                    np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel()
                    for a, b in zip(items, exact, strict=True)
                ]
            )
            speedup = f"{statistics.median(ratios):.2f} ({quartiles[0]:.2f}-{quartiles[2]:.2f})"
            print(
                f"{pipeline.manifest.name:<18} {gap:>4g} {f'{size[0]}x{size[1]}':>11} "
                f"{statistics.median(seconds[gap]) * 1000:7.1f} {speedup:>17} "
                f"{diff.mean():9.3f} {np.percentile(diff, 99.9):6.0f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
