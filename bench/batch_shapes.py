"""One dynamic-shape engine against static-shape sessions, fed what the service feeds it
(batch sizes, or a detector's image shapes, changing from one run to the next), side by
side in one run.

    python bench/batch_shapes.py --model-dir BUNDLE --device cuda [--precision fp16]
        [--max-batch-size 32] [--shapes 3] [--batches 48] [--cap-seconds 30]
        [--conv-algo-search heuristic]

Both engines are the service's `OnnxRuntimeEngine` over the same graph; `dynamic` is one
session (`--no-cuda-static-shapes`). For a graph with a batch axis, `static` is one
session per size of `static_sizes(--max-batch-size)`, each batch padded to the next
(`--cuda-static-shapes`, the default on CUDA), and the sequence is of batch sizes
(seeded, uniform over 1..max). For a detector (no batch axis; its input size follows each
image's aspect ratio), `shapes` is a session per input shape (`--cuda-shape-sessions`)
and the sequence is of single images in `--shapes` shapes fitted to the model's scale
(4:3 landscape and portrait, 16:9 both ways, square). Each engine is warmed once per size
or shape (the warm-up also stops after `--cap-seconds`), then runs the sequence; the
script prints, per engine, images/s over the sequence and the milliseconds per batch
(median, 90th percentile, largest), and the ratio of the two; each engine stops after
`--cap-seconds` of the sequence (the dynamic one took 0.7-2.2 s per batch on an H200 with
ONNX Runtime 1.31, docs/gpu.md). The two engines' outputs are compared batch by batch:
the script exits 1 when they differ by more than the precision's tolerance (or a
detector's count of detections differs).
On the CPU it runs too (ONNX Runtime's CPU provider does not plan per shape: the ratio
there is the padding's cost, or none).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hornet_bundle import load_bundle
from service.engines import OnnxRuntimeEngine, _batch_axis_name

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a batched bundle")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--precision", choices=sorted(TOLERANCE), default="fp32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--shapes", type=int, choices=range(2, 6), default=3, help="a detector's image shapes"
    )
    parser.add_argument("--batches", type=int, default=48, help="length of the sequence")
    parser.add_argument("--cap-seconds", type=float, default=30.0, help="per engine")
    parser.add_argument(
        "--conv-algo-search", choices=["exhaustive", "heuristic", "default"], default="exhaustive"
    )
    return parser.parse_args(argv)


def run_sequence(
    engine: OnnxRuntimeEngine, batches: list[dict[str, np.ndarray]], cap_s: float
) -> tuple[list[float], list[dict[str, np.ndarray]]]:
    """Milliseconds per batch and the outputs, over `batches` until `cap_s` has passed."""
    times, outputs, started = [], [], time.perf_counter()
    for batch in batches:
        begun = time.perf_counter()
        outputs.append(engine.run(batch))
        times.append((time.perf_counter() - begun) * 1000.0)
        if time.perf_counter() - started > cap_s:
            break
    return times, outputs


class Plan(NamedTuple):
    title: str
    batches: list[dict[str, np.ndarray]]
    images: list[int]  # per batch
    warm: Callable[[OnnxRuntimeEngine], list[dict[str, np.ndarray]]]
    options: dict  # the second engine's: static batch sessions or a session per shape
    unit: str  # what the warm-up runs once each
    name: str  # the second engine's


def sizes_plan(args: argparse.Namespace, ports, rng: np.random.Generator) -> Plan:
    """Batch sizes changing from one batch to the next (uniform over 1..max)."""
    sizes = [int(s) for s in rng.integers(1, args.max_batch_size + 1, args.batches)]
    full = {
        port.name: rng.integers(0, 256, (args.max_batch_size, *port.shape[1:]), dtype=np.uint8)
        for port in ports
    }

    def batch(size: int) -> dict[str, np.ndarray]:
        return {name: value[:size] for name, value in full.items()}

    def warm(engine: OnnxRuntimeEngine) -> list[dict[str, np.ndarray]]:
        return [batch(size) for size in engine.static_sizes or sorted(set(sizes))]

    title = f"sequence of {len(sizes)} batches: {' '.join(map(str, sizes))}"
    return Plan(
        title,
        [batch(s) for s in sizes],
        sizes,
        warm,
        {"static_batch": args.max_batch_size},
        "sizes",
        "static",
    )


def image_shapes(scale: tuple[int, int] | None, count: int) -> list[tuple[int, int]]:
    """`count` input sizes (height, width) that a detector fitting photographs to `scale`
    (long side, short side) is given: 4:3 landscape and portrait, 16:9 both ways, square."""
    long, short = scale or (256, 192)
    wide = round(long * 9 / 16)
    return [(short, long), (long, short), (wide, long), (long, wide), (short, short)][:count]


def shapes_plan(args: argparse.Namespace, ports, scale, rng: np.random.Generator) -> Plan:
    """One image per batch, its shape drawn from `args.shapes` shapes (the detector)."""
    shapes = image_shapes(tuple(scale) if scale else None, args.shapes)
    images = [{ports[0].name: rng.integers(0, 256, (*hw, 3), dtype=np.uint8)} for hw in shapes]
    order = [int(i) for i in rng.integers(0, len(shapes), args.batches)]
    title = f"sequence of {len(order)} images: " + " ".join(
        f"{shapes[i][0]}x{shapes[i][1]}" for i in order
    )
    batches = [images[i] for i in order]
    return Plan(
        title,
        batches,
        [1] * len(order),
        lambda _: images,
        {"shape_sessions": len(shapes)},
        "shapes",
        "shapes",
    )


def difference(one: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    """The largest difference between two engines' outputs relative to the largest value;
    infinite where an output's shape differs (a detector finding another count)."""
    worst = 0.0
    for key, value in one.items():
        if value.shape != other[key].shape:
            return float("inf")
        if value.size:
            scale = max(float(np.abs(value).max()), 1e-6)
            worst = max(worst, float(np.abs(value - other[key]).max()) / scale)
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bundle = load_bundle(args.model_dir)
    path = bundle.file(bundle.manifest.engine_for("onnx", args.precision).file)
    rng = np.random.default_rng(0)
    options = {
        "device": args.device,
        "precision": args.precision,
        "conv_algo_search": args.conv_algo_search,
    }
    dynamic = OnnxRuntimeEngine(path, **options)
    session = dynamic._sessions[0]
    if _batch_axis_name(session) is not None:
        plan = sizes_plan(args, session.get_inputs(), rng)
    else:
        plan = shapes_plan(args, session.get_inputs(), bundle.manifest.preprocess.scale, rng)
    engines = {"dynamic": dynamic, plan.name: OnnxRuntimeEngine(path, **plan.options, **options)}
    print(f"{path}  {args.device}/{args.precision}  search {args.conv_algo_search}  {plan.title}")
    results = {}
    for name, engine in engines.items():
        warm_ms, _ = run_sequence(engine, plan.warm(engine), args.cap_seconds)
        times, outputs = run_sequence(engine, plan.batches, args.cap_seconds)
        results[name] = (sum(plan.images[: len(times)]) / sum(times) * 1000.0, outputs)
        print(f"{name:8s} warm-up {sum(warm_ms) / 1000.0:6.1f} s ({len(warm_ms)} {plan.unit})  "
              f"{len(times)} batches  {results[name][0]:8.1f} img/s  ms per batch: median "
              f"{np.median(times):.1f}, p90 {np.percentile(times, 90):.1f}, "
              f"max {max(times):.1f}")  # fmt: skip
        engine.close()
    (dynamic_rate, dynamic_out), (static_rate, static_out) = results.values()
    print(f"{plan.name} / dynamic: {static_rate / dynamic_rate:.2f}x the images/s")
    pairs = zip(dynamic_out, static_out, strict=False)
    worst = max((difference(one, other) for one, other in pairs), default=0.0)
    print(f"largest difference between the engines' outputs: {worst:.1e} of the largest value")
    return 0 if worst <= TOLERANCE[args.precision] else 1


if __name__ == "__main__":
    sys.exit(main())
