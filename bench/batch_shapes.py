"""One dynamic-shape engine against static batch sessions, fed the batches a dynamic
batcher forms (sizes changing from one batch to the next), side by side in one run.

    python bench/batch_shapes.py --model-dir BUNDLE --device cuda [--precision fp16]
        [--max-batch-size 32] [--batches 48] [--cap-seconds 30] [--conv-algo-search heuristic]

Both engines are the service's `OnnxRuntimeEngine` over the same graph: `dynamic` is one
session (`--no-cuda-static-shapes`), warmed once at every size the sequence holds;
`static` is one session per size of `static_sizes(--max-batch-size)`, each batch padded
to the next (`--cuda-static-shapes`, the default on CUDA), each session warmed once (each
warm-up also stops after `--cap-seconds`). Both
then run the same sequence of batch sizes (seeded, uniform over 1..max) and the script
prints, per engine, images/s over the sequence and the milliseconds per batch (median,
90th percentile, largest), and the ratio of the two; each engine stops after
`--cap-seconds` of the sequence (the dynamic one took 0.7-2.2 s per batch on an H200 with
ONNX Runtime 1.31, docs/gpu.md). The two engines' outputs are compared batch by batch:
the script exits 1 when they differ by more than the precision's tolerance.
On the CPU it runs too (ONNX Runtime's CPU provider does not plan per shape: the ratio
there is the padding's cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from hornet_bundle import load_bundle
from service.engines import OnnxRuntimeEngine

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a batched bundle")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--precision", choices=sorted(TOLERANCE), default="fp32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=48, help="length of the sequence")
    parser.add_argument("--cap-seconds", type=float, default=30.0, help="per engine")
    parser.add_argument(
        "--conv-algo-search", choices=["exhaustive", "heuristic", "default"], default="exhaustive"
    )
    return parser.parse_args(argv)


def run_sequence(
    engine: OnnxRuntimeEngine, inputs: dict[str, np.ndarray], sizes: list[int], cap_s: float
) -> tuple[list[float], list[dict[str, np.ndarray]]]:
    """Milliseconds per batch and the outputs, over `sizes` until `cap_s` has passed."""
    times, outputs, started = [], [], time.perf_counter()
    for size in sizes:
        batch = {name: value[:size] for name, value in inputs.items()}
        begun = time.perf_counter()
        outputs.append(engine.run(batch))
        times.append((time.perf_counter() - begun) * 1000.0)
        if time.perf_counter() - started > cap_s:
            break
    return times, outputs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bundle = load_bundle(args.model_dir)
    path = bundle.file(bundle.manifest.engine_for("onnx", args.precision).file)
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, args.max_batch_size + 1, args.batches)]
    options = {
        "device": args.device,
        "precision": args.precision,
        "conv_algo_search": args.conv_algo_search,
    }
    engines = {
        "dynamic": OnnxRuntimeEngine(path, **options),
        "static": OnnxRuntimeEngine(path, static_batch=args.max_batch_size, **options),
    }
    if not engines["static"].static_sizes:
        print(f"{path}: the graph's batch axis cannot be fixed (no static sessions)")
        return 2
    session = engines["dynamic"]._sessions[0]
    inputs = {
        port.name: rng.integers(0, 256, (args.max_batch_size, *port.shape[1:]), dtype=np.uint8)
        for port in session.get_inputs()
    }
    print(f"{path}  {args.device}/{args.precision}  search {args.conv_algo_search}  "
          f"sequence of {len(sizes)} batches: {' '.join(map(str, sizes))}")  # fmt: skip
    results = {}
    for name, engine in engines.items():
        warm = sorted(set(sizes)) if name == "dynamic" else list(engine.static_sizes)
        warm_ms, _ = run_sequence(engine, inputs, warm, args.cap_seconds)
        warmed, warm_s = len(warm_ms), sum(warm_ms) / 1000.0
        times, outputs = run_sequence(engine, inputs, sizes, args.cap_seconds)
        images = sum(sizes[: len(times)])
        results[name] = (images / sum(times) * 1000.0, outputs)
        print(f"{name:8s} warm-up {warm_s:6.1f} s ({warmed} sizes)  {len(times)} batches  "
              f"{results[name][0]:8.1f} img/s  ms per batch: median "
              f"{np.median(times):.1f}, p90 {np.percentile(times, 90):.1f}, "
              f"max {max(times):.1f}")  # fmt: skip
        engine.close()
    dynamic, static = results["dynamic"], results["static"]
    print(f"static / dynamic: {static[0] / dynamic[0]:.2f}x the images/s")
    worst = 0.0
    for one, other in zip(dynamic[1], static[1], strict=False):
        for key, value in one.items():
            scale = max(float(np.abs(value).max()), 1e-6)
            worst = max(worst, float(np.abs(value - other[key]).max()) / scale)
    print(f"largest difference between the engines' outputs: {worst:.1e} of the largest value")
    return 0 if worst <= TOLERANCE[args.precision] else 1


if __name__ == "__main__":
    sys.exit(main())
