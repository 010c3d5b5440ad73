"""Raw engine throughput and latency of model bundles, side by side in one run.

    python bench/throughput.py BUNDLE [BUNDLE ...] [--batch 1,8] [--rounds 5] [--seconds 1]
    python bench/throughput.py --gf-compare [--image-size 224]

Each bundle's ONNX engine (and TensorRT engine where tensorrt and a GPU are present)
runs on its own input in alternating rounds (A, B, A, B, ...), so a noisy machine
slows every engine alike; the table gives the median round per engine and batch size.
`--gf-compare` exports hornet_tiny_7x7 and hornet_tiny_gf (random weights: speed does
not depend on them) with each Global Filter graph (DFT-free auto, circular conv, and
the ONNX DFT op) and prints each one's throughput as a ratio of the 7x7 model's.
Nothing here is asserted; it prints measurements.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bundle import load_bundle  # noqa: E402


class OrtRunner:
    def __init__(self, path: Path, input_name: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = input_name

    def __call__(self, batch: np.ndarray) -> None:
        self.session.run(None, {self.input_name: batch})


def runners(bundle_dir: Path, threads: int) -> list[tuple[str, object, np.dtype, tuple]]:
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    spec = manifest.inputs[0]
    dtype = np.dtype(spec.dtype)
    found = []
    for engine in manifest.engines:
        label = f"{manifest.name} {engine.format}/{engine.precision} (GF {engine.gf_mode})"
        if engine.format == "onnx":
            found.append((label, OrtRunner(bundle.path / engine.file, spec.name, threads), dtype, spec.shape[1:]))
        elif engine.format == "tensorrt":
            try:
                from service.engines import TensorRTEngine

                trt = TensorRTEngine(bundle.path / engine.file, engine)
                found.append((label, lambda b, trt=trt, n=spec.name: trt.run({n: b}), dtype, spec.shape[1:]))
            except Exception as exc:  # no GPU/tensorrt here: say so, measure the rest
                print(f"# skipping {label}: {exc}", file=sys.stderr)
    return found


def measure(items, batches: list[int], rounds: int, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    results: dict = {}
    for batch in batches:
        inputs = [rng.integers(0, 256, (batch, *shape)).astype(dtype) for _, _, dtype, shape in items]
        for (_, run, _, _), x in zip(items, inputs):
            run(x)  # warm-up
        for _ in range(rounds):
            for (label, run, _, _), x in zip(items, inputs):
                latencies = []
                start = time.perf_counter()
                while time.perf_counter() - start < seconds or not latencies:
                    t0 = time.perf_counter()
                    run(x)
                    latencies.append(time.perf_counter() - t0)
                elapsed = time.perf_counter() - start
                entry = results.setdefault((label, batch), {"throughput": [], "latency": []})
                entry["throughput"].append(batch * len(latencies) / elapsed)
                entry["latency"].extend(latencies)
    return results


def table(results: dict) -> str:
    lines = [f"{'engine':58} {'batch':>5} {'img/s':>9} {'p50 ms':>9} {'p95 ms':>9}"]
    for (label, batch), entry in results.items():
        lat = np.array(entry["latency"]) * 1e3
        lines.append(
            f"{label:58} {batch:5d} {statistics.median(entry['throughput']):9.1f} "
            f"{np.percentile(lat, 50):9.1f} {np.percentile(lat, 95):9.1f}"
        )
    return "\n".join(lines)


def gf_compare(image_size: int, modes: list[str], work: Path) -> list[Path]:
    from model_export.export import export_bundle

    bundles = []
    jobs = [("hornet_tiny_7x7", "auto")] + [("hornet_tiny_gf", mode) for mode in modes]
    for variant, mode in jobs:
        out = work / (f"{variant}" if mode == "auto" else f"{variant}_{mode}")
        print(f"# exporting {out.name} ...", file=sys.stderr, flush=True)
        export_bundle(variant, out, image_size=image_size, gf_mode=mode, name=out.name)
        bundles.append(out)
    return bundles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", type=Path)
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--gf-compare", action="store_true")
    parser.add_argument("--gf-modes", default="auto,circular_conv,dft")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        bundles = list(args.bundles)
        if args.gf_compare:
            bundles += gf_compare(args.image_size, args.gf_modes.split(","), Path(tmp))
        if not bundles:
            parser.error("give bundle directories or --gf-compare")
        items = [item for b in bundles for item in runners(b, args.threads)]
        print(f"# {os.cpu_count()} CPUs, onnxruntime threads={args.threads or 'default'}, "
              f"{args.rounds} alternating rounds of {args.seconds}s, median round reported")
        results = measure(items, batches, args.rounds, args.seconds)
        print(table(results))
        if args.gf_compare:
            base = items[0][0]
            print("\nGF throughput / 7x7 throughput at equal size "
                  f"({args.image_size}px; target on 2 CPUs: DFT-free >= 0.9):")
            for label, *_ in items[1:]:
                for batch in batches:
                    ratio = statistics.median(results[(label, batch)]["throughput"]) / statistics.median(
                        results[(base, batch)]["throughput"])
                    print(f"  {label:58} batch {batch:3d}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
