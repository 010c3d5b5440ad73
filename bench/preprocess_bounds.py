"""Time and memory of decoding + preprocessing per route for hostile image shapes.

    python bench/preprocess_bounds.py [--model-dir DIR ...] [--repeat 3]

For each bundle (default: the packaged demo models) and each shape (extreme aspect
ratios, a 36-megapixel photo), runs exactly what a request's decoding thread runs
(`decode_image` then the pipeline's `prepare`) and, for segmentation and detection,
the answer's host side (`finish`: the full-size mask, the pasted RLE masks) on a
synthetic engine output of the right shape. Prints the median seconds of each step and
the process's peak RSS growth, so the "bounded by the model's input" rule can be read
off: every shape within --max-pixels, never proportional to the aspect ratio.
HORNET_JPEG_REDUCING_GAP=2 (the server's --jpeg-reducing-gap) times the reduced JPEG
decode instead.
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hornet_bundle import load_bundle
from service.imaging import decode_image, draft_size
from service.pipelines import AnswerOptions, pipeline_for
from service.settings import Settings

SHAPES = [(40000, 1), (1, 40000), (20000, 2), (2, 20000), (6000, 6000)]


def _encoded(width: int, height: int) -> bytes:
    values = np.linspace(0, 255, width * height, dtype=np.float32).reshape(height, width)
    rgb = np.stack([values, 255 - values, np.full_like(values, 90)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG" if width * height > 10**6 else "PNG")
    return buffer.getvalue()


def _engine_output(pipeline, prepared) -> list:
    """What the engine would hand back for `prepared`, shaped like the real thing."""
    manifest = pipeline.manifest
    if manifest.task == "classify":
        return [np.zeros(len(manifest.labels), np.float32)]
    if manifest.task == "segment":
        crop = pipeline.window.crop
        rng = np.random.default_rng(0)
        return [rng.normal(size=(len(manifest.labels), *crop)).astype(np.float32)] * len(
            prepared.items
        )
    height, width = prepared.items[0].shape[:2]
    boxes = np.array([[0.1, 0.1, 0.6, 0.6], [0.3, 0.2, 0.9, 0.95]], np.float32)
    masks = np.zeros((2, 1, height, width), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes * [width, height, width, height]):
        masks[k, 0, int(y1) : int(y2), int(x1) : int(x2)] = 0.9
    return [
        {
            "boxes": boxes * [width, height, width, height],
            "labels": np.array([0, 1]),
            "scores": np.array([0.9, 0.8], np.float32),
            "masks": masks,
        }
    ]


def _finish(pipeline, prepared, outputs) -> None:
    pipeline.finish(prepared, outputs, AnswerOptions())


def _median_seconds(step, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = step()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", action="append", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    settings = Settings() if not args.model_dir else Settings(model_dir=args.model_dir)
    encoded = {shape: _encoded(*shape) for shape in SHAPES}
    print(f"{'model':<16} {'image':>11} {'decode s':>9} {'prepare s':>9} {'finish s':>9}")
    for directory in settings.model_dir:
        pipeline = pipeline_for(load_bundle(directory).manifest)
        gap = settings.jpeg_reducing_gap
        draft = draft_size(pipeline.first_resize, gap) if gap else None
        for shape, data in encoded.items():
            decode_s, decoded = _median_seconds(
                lambda data=data, draft=draft: decode_image(data, settings.max_pixels, draft=draft),
                args.repeat,
            )
            prepare_s, prepared = _median_seconds(
                lambda decoded=decoded, pipeline=pipeline: pipeline.prepare(decoded), args.repeat
            )
            outputs = _engine_output(pipeline, prepared)
            finish_s, _ = _median_seconds(
                lambda p=prepared, o=outputs, pipeline=pipeline: _finish(pipeline, p, o),
                args.repeat,
            )
            label = f"{shape[0]}x{shape[1]}"
            print(
                f"{pipeline.manifest.name:<16} {label:>11} {decode_s:9.3f} {prepare_s:9.3f} "
                f"{finish_s:9.3f}"
            )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
