"""Raw engine throughput and latency of model bundles, side by side in one run.

    python bench/throughput.py BUNDLE [BUNDLE ...] [--batch 1,8] [--rounds 5] [--seconds 1]
    python bench/throughput.py --gf-compare [--image-size 224] [--fp16]
    python bench/throughput.py --gf-compare --device cuda --fp16 --torch
    python bench/throughput.py BUNDLE --engines onnxruntime,openvino --openvino-precision fp32,bf16
    python bench/throughput.py BUNDLE --engines onnxruntime,openvino --openvino-precision fp32,int8
    python bench/throughput.py T7 GF --engines onnxruntime,openvino --instances 2 --threads 1

Each bundle's ONNX engine (and TensorRT engine where tensorrt and a GPU are present)
runs on its own input in alternating rounds (A, B, A, B, ...), so a noisy machine
slows every engine alike; the table gives the median round per engine and batch size,
and each ratio is the median of the round-by-round ratios (with their quartiles).
ONNX graphs run through the service's own engine class (`--device cuda`: the CUDA
execution provider with IO binding, as `hornet serve --device cuda` runs them).
`--gf-compare` exports hornet_tiny_7x7 and hornet_tiny_gf (random weights: speed does
not depend on them) with each Global Filter graph (DFT-free auto, circular conv, and
the ONNX DFT op) and prints each one's throughput as a ratio of the 7x7 model's.
`--torch` adds the eager torch model of each classifier bundle's registry variant
(`hornet export` bundles; not the demo ones) on the same device, fed
the same uint8 images (copied over, normalised there, logits copied back): what a
plain PyTorch server runs; the table then gives every engine's ratio to it.
`--engines onnxruntime,openvino` adds OpenVINO (the service's `--engine openvino`) over
each bundle's fp32 graph at each `--openvino-precision` (bf16 only where the CPU has
bf16 arithmetic; otherwise skipped, saying so; int8 runs the bundle's int8 graph,
`hornet export --int8`) and prints its ratio to ONNX Runtime fp32 of the same bundle, as
it does for ONNX Runtime's run of an int8 graph; `--openvino-static` adds each again with
static shapes (the server's `--openvino-static-shapes`, max batch the largest `--batch`),
labelled openvino-static. Whenever hornet_tiny_7x7 and
hornet_tiny_gf bundles are both measured (`--gf-compare`, or given), each engine's GF is
compared with its own 7x7. `--instances K` runs each ONNX Runtime and OpenVINO engine
K times over, side by side, each in a thread of its own and each with weights of its
own (the server's `--instances K --no-share-weights`; shared weights ran at the same
speed, bench/README.md); with `--threads 1` that is one single-thread engine per core,
the layout `hornet tune` picks on small CPU hosts. The figures are their sum.
Nothing here is asserted; it prints measurements.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hornet_bundle import Bundle, load_bundle


class OrtRunner:
    def __init__(
        self, path: Path, input_name: str, threads: int, device: str, precision: str
    ) -> None:
        from service.engines import OnnxRuntimeEngine

        # Spinning intra-op threads: ONNX Runtime's own default, its fastest raw figure.
        self.engine = OnnxRuntimeEngine(
            path, device=device, precision=precision, threads=threads, spinning=True
        )
        self.input_name = input_name

    def __call__(self, batch: np.ndarray) -> None:
        self.engine.run({self.input_name: batch})


class OpenVinoRunner:
    def __init__(
        self, path: Path, input_name: str, threads: int, precision: str, static_batch: int = 0
    ) -> None:
        from service.engines import OpenVinoEngine

        self.engine = OpenVinoEngine(
            path, precision=precision, threads=threads, static_batch=static_batch
        )
        self.input_name = input_name

    def __call__(self, batch: np.ndarray) -> None:
        self.engine.run({self.input_name: batch})


class TorchRunner:
    """The eager model of a bundle's variant: uint8 NHWC in, logits back on the host."""

    def __init__(self, manifest, device: str, half: bool) -> None:
        import torch

        from model_export import create_model

        pre = manifest.preprocess
        self.torch = torch
        self.dtype = torch.float16 if half else torch.float32
        self.device = torch.device(device)
        model = create_model(
            manifest.variant, num_classes=len(manifest.labels), image_size=pre.input_size[0]
        )
        self.model = model.to(self.device, self.dtype).eval()
        self.mean = torch.tensor(pre.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, batch: np.ndarray) -> None:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
            x = ((x - self.mean) / self.std).to(self.dtype)
            self.model(x).float().cpu()


class Item(NamedTuple):
    label: str
    run: Callable[[np.ndarray], object]
    dtype: np.dtype
    shape: tuple  # one call's input: None for the batch axis (see call_shape)
    variant: str
    kind: str  # "onnx", "tensorrt", "openvino" or "torch"
    precision: str
    bundle: str = ""
    # The other --instances engines of the same graph (weights of their own), each run in
    # a thread of its own beside `run`; the figure is their sum.
    siblings: tuple[Callable[[np.ndarray], object], ...] = ()


def runners(
    bundle: Bundle,
    threads: int,
    device: str = "cpu",
    openvino: tuple[str, ...] = (),
    static_batch: int = 0,
    instances: int = 1,
) -> list[Item]:
    """One item per engine of a bundle, and one per `openvino` precision over its fp32
    graph, each `instances` times over (ONNX Runtime and OpenVINO; TensorRT once). Graphs
    without a batch axis (detectors take one image of any size) get the preprocessing's
    input size and run one image per call."""
    manifest = bundle.manifest
    spec = manifest.inputs[0]
    dtype = np.dtype(spec.dtype)
    shape = call_shape(spec.shape, spec.layout, manifest.preprocess.input_size)
    found = []
    for engine in manifest.engines:
        label = f"{manifest.name} {engine.format}/{engine.precision} (GF {engine.gf_mode})"
        siblings: tuple = ()
        if engine.format == "onnx":
            made = [
                OrtRunner(bundle.path / engine.file, spec.name, threads, device, engine.precision)
                for _ in range(instances)
            ]
            run, siblings = made[0], tuple(made[1:])
        else:
            try:
                from service.engines import TensorRTEngine

                trt = TensorRTEngine(bundle.path / engine.file, engine)
            except Exception as exc:  # no GPU/tensorrt here: say so, measure the rest
                print(f"# skipping {label}: {exc}", file=sys.stderr)
                continue
            run = lambda b, trt=trt, n=spec.name: trt.run({n: b})  # noqa: E731
        found.append(
            Item(
                label,
                run,
                dtype,
                shape,
                manifest.variant,
                engine.format,
                engine.precision,
                manifest.name,
                siblings,
            )
        )
    shapes = [("openvino", 0)] + ([("openvino-static", static_batch)] if static_batch else [])
    for precision in openvino:
        graph = manifest.engine_for("onnx", "int8" if precision == "int8" else "fp32")
        for kind, batch in shapes:
            label = f"{manifest.name} {kind}/{precision} (GF {graph.gf_mode})"
            try:
                path = bundle.path / graph.file
                made = [
                    OpenVinoRunner(path, spec.name, threads, precision, batch)
                    for _ in range(instances)
                ]
            except Exception as exc:  # no openvino or no bf16 here: say so, measure the rest
                print(f"# skipping {label}: {exc}", file=sys.stderr)
                continue
            found.append(
                Item(
                    label,
                    made[0],
                    dtype,
                    shape,
                    manifest.variant,
                    kind,
                    precision,
                    manifest.name,
                    tuple(made[1:]),
                )
            )
    return found


def eager_baselines(bundles: list[Bundle], device: str) -> list[Item]:
    """The eager torch model of each registry classifier variant, once per precision its
    bundles have: `hornet export` bundles only (the demo bundles are tiny custom networks
    under a registry variant's name), fed the same uint8 NHWC input."""
    found: dict[tuple[str, str], Item] = {}
    for bundle in bundles:
        manifest = bundle.manifest
        spec = manifest.inputs[0]
        if (
            manifest.task != "classify"
            or manifest.demo
            or (spec.dtype, spec.layout) != ("uint8", "NHWC")
        ):
            continue
        shape = call_shape(spec.shape, spec.layout, manifest.preprocess.input_size)
        for precision in sorted({e.precision for e in manifest.engines}):
            key = (manifest.variant, precision)
            if key not in found:
                run = TorchRunner(manifest, device, precision == "fp16")
                label = f"{manifest.variant} torch eager/{precision}"
                found[key] = Item(
                    label, run, np.dtype("uint8"), shape, manifest.variant, "torch", precision
                )
    return list(found.values())


def call_shape(shape: list[int], layout: str, input_size: tuple[int, int]) -> tuple:
    """One call's input shape: None for the batch axis, -1 spatial sizes from the
    preprocessing's (height, width)."""
    spatial = {"NHWC": (1, 2), "NCHW": (2, 3), "HWC": (0, 1)}.get(
        layout if len(shape) == 4 else "HWC", ()
    )
    sizes = dict(zip(spatial, input_size, strict=True))
    filled = tuple(sizes.get(axis, n) if n == -1 else n for axis, n in enumerate(shape))
    return (None, *filled[1:]) if len(shape) == 4 else filled


def measure(items, batches: list[int], rounds: int, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    results: dict = {}
    for batch in batches:
        # Graphs without a batch axis take one image per call: measured at batch 1 only.
        runs = [item for item in items if item.shape[0] is None or batch == 1]
        shapes = [(batch, *i.shape[1:]) if i.shape[0] is None else i.shape for i in runs]
        inputs = [
            rng.integers(0, 256, shape).astype(item.dtype)
            for item, shape in zip(runs, shapes, strict=True)
        ]
        for item, x in zip(runs, inputs, strict=True):
            for run in (item.run, *item.siblings):
                run(x)  # warm-up
        for _ in range(rounds):
            for item, x in zip(runs, inputs, strict=True):
                latencies, elapsed = timed_side_by_side((item.run, *item.siblings), x, seconds)
                entry = results.setdefault((item.label, batch), {"throughput": [], "latency": []})
                entry["throughput"].append(batch * len(latencies) / elapsed)
                entry["latency"].extend(latencies)
    return results


def timed_side_by_side(
    runs: tuple[Callable[[np.ndarray], object], ...], x: np.ndarray, seconds: float
) -> tuple[list[float], float]:
    """Each of `runs` called on `x` over and over in a thread of its own, all started
    together, until `seconds` have passed (at least once each): every call's latency,
    and the seconds from the start until the last call returned."""
    latencies: list[float] = []
    start = time.perf_counter()

    def loop(run: Callable[[np.ndarray], object]) -> None:
        mine = []
        while time.perf_counter() - start < seconds or not mine:
            t0 = time.perf_counter()
            run(x)
            mine.append(time.perf_counter() - t0)
        latencies.extend(mine)  # list.extend is atomic under the GIL

    if len(runs) == 1:
        loop(runs[0])
    else:
        threads = [threading.Thread(target=loop, args=(run,)) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return latencies, time.perf_counter() - start


def table(results: dict) -> str:
    lines = [f"{'engine':58} {'batch':>5} {'img/s':>9} {'p50 ms':>9} {'p95 ms':>9}"]
    for (label, batch), entry in results.items():
        lat = np.array(entry["latency"]) * 1e3
        lines.append(
            f"{label:58} {batch:5d} {statistics.median(entry['throughput']):9.1f} "
            f"{np.percentile(lat, 50):9.1f} {np.percentile(lat, 95):9.1f}"
        )
    return "\n".join(lines)


def paired_ratio(results: dict, label: str, base: str, batch: int) -> tuple[float, float, float]:
    """Throughput of `label` over `base`, round by round (the two ran back to back in each
    round, so load from elsewhere hits both alike): median, and the quartiles of the ratio."""
    ratios = [
        a / b
        for a, b in zip(
            results[(label, batch)]["throughput"], results[(base, batch)]["throughput"], strict=True
        )
    ]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), quartiles[0], quartiles[2]


def print_ratio(label: str, base: str, results: dict, batches: list[int]) -> None:
    for batch in batches:
        if (label, batch) not in results:  # graphs without a batch axis: batch 1 only
            continue
        ratio, low, high = paired_ratio(results, label, base, batch)
        spread = f"(rounds' quartiles {low:.2f}-{high:.2f})"
        print(f"  {label:58} batch {batch:3d}: {ratio:.2f}x  {spread}")


def describe(device: str) -> str:
    if device == "cpu":
        return f"{os.cpu_count()} CPUs"
    try:
        import torch

        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}), {os.cpu_count()} CPUs"
    except Exception:  # noqa: BLE001 - only a label
        return "CUDA device"


def gf_compare(image_size: int, modes: list[str], work: Path, fp16: bool) -> list[Path]:
    from model_export.export import ExportOptions, export

    bundles = []
    jobs = [("hornet_tiny_7x7", "auto")] + [("hornet_tiny_gf", mode) for mode in modes]
    for variant, mode in jobs:
        out = work / (f"{variant}" if mode == "auto" else f"{variant}_{mode}")
        print(f"# exporting {out.name} ...", file=sys.stderr, flush=True)
        options = ExportOptions(image_size=image_size, gf_mode=mode, name=out.name, fp16=fp16)
        export(variant, out, options)
        bundles.append(out)
    return bundles


def ort_fp32(item: Item, items: list[Item]) -> Item | None:
    """The ONNX Runtime run of `item`'s bundle's fp32 graph."""
    wanted = (item.bundle, "onnx", "fp32")
    return next((o for o in items if (o.bundle, o.kind, o.precision) == wanted), None)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundles", nargs="*", type=Path)
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)"
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="run each ONNX Runtime and OpenVINO engine as this many instances side by side, "
        "each in a thread of its own with weights of its own (the server's --instances "
        "--no-share-weights; with --threads 1, one single-thread engine per core); the "
        "figures are their sum",
    )
    parser.add_argument("--gf-compare", action="store_true")
    parser.add_argument("--gf-modes", default="auto,circular_conv,dft")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--fp16", action="store_true", help="--gf-compare exports fp16 graphs too")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the ONNX graphs (and --torch models) run",
    )
    parser.add_argument(
        "--torch",
        action="store_true",
        help="also time each variant's eager torch model (needs torch)",
    )
    parser.add_argument(
        "--engines",
        default="onnxruntime",
        help="comma-separated: onnxruntime (each bundle's graphs), openvino (its fp32 graph)",
    )
    parser.add_argument(
        "--openvino-precision",
        default="fp32",
        help="comma-separated precisions OpenVINO runs the fp32 graph at: fp32, bf16",
    )
    parser.add_argument(
        "--openvino-static",
        action="store_true",
        help="also run OpenVINO with static shapes (--openvino-static-shapes, max batch the "
        "largest --batch), as openvino-static",
    )
    args = parser.parse_args()
    engines = args.engines.split(",")
    openvino = tuple(args.openvino_precision.split(",")) if "openvino" in engines else ()
    batches = [int(b) for b in args.batch.split(",")]
    static_batch = max(batches) if args.openvino_static else 0
    with tempfile.TemporaryDirectory() as tmp:
        bundles = list(args.bundles)
        if args.gf_compare:
            bundles += gf_compare(args.image_size, args.gf_modes.split(","), Path(tmp), args.fp16)
        if not bundles:
            parser.error("give bundle directories or --gf-compare")
        loaded = [load_bundle(path) for path in bundles]
        items = [
            item
            for bundle in loaded
            for item in runners(
                bundle, args.threads, args.device, openvino, static_batch, args.instances
            )
        ]
        if args.torch:
            items += eager_baselines(loaded, args.device)
        print(
            f"# {describe(args.device)}, {args.instances} instance(s) of "
            f"engine threads={args.threads or 'default'}, "
            f"{args.rounds} alternating rounds of {args.seconds}s, median round reported"
        )
        results = measure(items, batches, args.rounds, args.seconds)
        print(table(results))

        def counterpart(item: Item, variant: str, kind: str) -> Item | None:
            wanted = (variant, kind, item.precision)
            return next((o for o in items if (o.variant, o.kind, o.precision) == wanted), None)

        pairs = [(item, counterpart(item, item.variant, "torch")) for item in items]
        pairs = [(item, base) for item, base in pairs if item.kind != "torch" and base]
        if pairs:
            print("\nthroughput / eager torch of the same variant and precision:")
            for item, base in pairs:
                print_ratio(item.label, base.label, results, batches)
        others = [
            i
            for i in items
            if i.kind.startswith("openvino") or (i.kind, i.precision) == ("onnx", "int8")
        ]
        ov_pairs = [(item, ort_fp32(item, items)) for item in others]
        ov_pairs = [(item, base) for item, base in ov_pairs if base]
        if ov_pairs:
            print("\nthroughput / ONNX Runtime fp32 of the same bundle:")
            for item, base in ov_pairs:
                print_ratio(item.label, base.label, results, batches)
        variants = {item.variant for item in items}
        if {"hornet_tiny_7x7", "hornet_tiny_gf"} <= variants:
            print(
                "\nGF throughput / 7x7 throughput of the same engine at equal size "
                "(target on 2 CPUs: DFT-free >= 0.9):"
            )
            for item in items:
                base = counterpart(item, "hornet_tiny_7x7", item.kind)
                if item.variant == "hornet_tiny_gf" and base:
                    print_ratio(item.label, base.label, results, batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
