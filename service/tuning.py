"""`hornet tune BUNDLE`: which engine, precision and layout of the cores serve a bundle
fastest on this host, measured here, and the `hornet serve` flags for it.

The fastest setting differs from CPU to CPU (bench/README.md: OpenVINO int8 with static
shapes on a Zen 4 EPYC with VNNI, bf16 on a Xeon with AMX, ONNX Runtime on an AVX2 EPYC;
one engine per core under load everywhere, one engine of all the cores for a lone
request), so it is measured rather than guessed. Each candidate the server could run
here, from what is installed, what the CPU does and what the bundle holds:

- engines: ONNX Runtime, and OpenVINO when installed;
- precisions: fp32; int8 where the bundle has its int8 graph; bf16 on OpenVINO where
  the CPU does bf16 arithmetic (AVX512_BF16 or AMX);
- layouts: one engine of all the CPUs the process may use (the default) and one
  single-thread engine per CPU (sharing one copy of the weights, --share-weights);
- OpenVINO with and without --openvino-static-shapes (not for a detector, whose input
  size varies).

Each runs in a fresh process (so no candidate's threads or memory disturb the next):
the service's own pipeline prepares a JPEG photo's items exactly as for a request, and
the engines run batches (images; a segmenter's tiles; a detector one image per call)
side by side, one thread each, as the batcher drives them, at every power of two up to
--max-batch-size; then one engine runs a lone image, and for one single-thread engine
per CPU the engine `--solo-engine` would add runs it too. Printed per candidate: images
per second under load at its best batch size, the batch size it recommends (the
smallest within BATCH_NEAR of that: on the CPU a bigger batch is often slower per image,
ONNX Runtime fp32 on the AMX Xeon 31 img/s at 2 and 25 at 8, and a smaller one is
answered sooner), the lone image's latency, and the memory the engines took;
candidates whose precision the bundle was not verified for are measured but not
recommended (`hornet verify`, `hornet export --int8`). The figures are the bare engines'
(bench/loadgen.py measures the HTTP server against them), and the candidates the CPU's
(a GPU's are in docs/gpu.md).

`hornet tune A B ...` measures each bundle alone, in turn, and ends with one command that
serves them all, each with its pick as `--model-setting MODEL:NAME=VALUE`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from hornet_bundle import Bundle, EngineUnavailable, load_bundle
from hornet_cli import Command
from service.cpus import available_cpus
from service.engines import (
    cpu_runs_bf16,
    create_engine,
    instances_of,
    static_sizes,
    unverified_precision,
)
from service.errors import ServiceError
from service.flags import settings_environment, settings_flags, settings_problems
from service.imaging import decode_image
from service.pipelines import pipeline_for
from service.settings import Settings, model_setting_texts

MEASURE_TIMEOUT_S = 600.0
NEAR = 0.05  # candidates this close to the fastest are named with it
# The recommended --max-batch-size: the smallest measured batch size this close to the
# candidate's best images/s (a smaller batch waits less for its items and is answered
# sooner; within the noise of one measurement it costs nothing under load).
BATCH_NEAR = 0.02


@dataclass(frozen=True)
class Candidate:
    """One way to serve the bundle: what `hornet serve` would be told."""

    engine: str
    precision: str
    instances: int
    threads: int
    static_shapes: bool = False

    def values(self) -> dict[str, Any]:
        """The settings that make `hornet serve` run this candidate (field -> value);
        static shapes said either way for OpenVINO (an environment may have set them),
        left out for ONNX Runtime, which ignores them."""
        openvino = self.engine == "openvino"
        return {
            "engine": self.engine,
            "precision": self.precision,
            "instances": self.instances,
            "engine_threads": self.threads,
            "openvino_static_shapes": self.static_shapes if openvino else None,
        }

    def settings(self, base: Settings) -> Settings:
        """`base` (the HORNET_* environment's settings: batch size, sharing, spinning)
        run as this candidate, on the CPU whatever HORNET_DEVICE says (a GPU image sets
        cuda)."""
        values = self.values() | {"openvino_static_shapes": self.static_shapes}
        return base.model_copy(update={"device": "cpu", **values})

    def flags(self) -> list[str]:
        return settings_flags(Settings, self.values())

    def environment(self) -> dict[str, str]:
        """The same as HORNET_* variables (a container's, a ConfigMap's)."""
        return settings_environment(Settings, self.values())

    @property
    def name(self) -> str:
        static = ", static shapes" if self.static_shapes else ""
        return f"{self.engine} {self.precision}, {self.instances} x {self.threads}{static}"


@dataclass
class Measured:
    """A candidate's figures, or why it could not run here."""

    candidate: Candidate
    images_per_s: float = 0.0  # under load, at batch_size
    lone_ms: float = 0.0
    memory_mib: float = 0.0
    # One single-thread engine per CPU: a lone image on the engine --solo-engine adds
    # (over all the CPUs), and that engine's memory; 0 for other layouts.
    solo_lone_ms: float = 0.0
    solo_memory_mib: float = 0.0
    unverified: str | None = None  # why the server would refuse it without a flag
    error: str | None = None
    batch_size: int = 0  # the --max-batch-size recommended (see BATCH_NEAR)
    # images/s under load at each batch size measured, by size
    by_batch: dict[int, float] = field(default_factory=dict)


def candidates(bundle: Bundle, cpus: int, openvino: bool | None = None) -> list[Candidate]:
    """Every candidate the server could run for `bundle` on this host's `cpus` CPUs
    (`openvino`: whether the engine is installed; None: find out)."""
    if openvino is None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            openvino = False
        else:
            openvino = True
    int8 = _has_graph(bundle, "int8")
    precisions = {"onnxruntime": ["fp32"] + (["int8"] if int8 else [])}
    if openvino:
        bf16 = ["bf16"] if cpu_runs_bf16() else []
        precisions["openvino"] = ["fp32", *bf16] + (["int8"] if int8 else [])
    layouts = [(1, cpus)] + ([(cpus, 1)] if cpus > 1 else [])
    static = [False] + ([True] if bundle.manifest.task != "detect" else [])
    found = []
    for engine, names in precisions.items():
        for precision in names:
            for instances, threads in layouts:
                for shapes in static if engine == "openvino" else [False]:
                    found.append(Candidate(engine, precision, instances, threads, shapes))
    return found


def _has_graph(bundle: Bundle, precision: str) -> bool:
    try:
        bundle.manifest.engine_for("onnx", precision)
    except LookupError:
        return False
    return True


def photo(size: tuple[int, int] = (640, 480)) -> bytes:
    """A smooth synthetic picture as a JPEG: gradients, no objects. A classifier's or a
    segmenter's speed does not depend on the content; a detector's does (each detection
    kept costs its mask head), so `hornet tune --image` takes one of the user's own."""
    from PIL import Image

    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([255 * x / width, 255 * y / height, 96 + 64 * np.sin(x / width * 3)], -1)
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run_side_by_side(
    pipeline: Any, engines: Sequence[Any], items: list[np.ndarray], seconds: float
) -> tuple[float, float]:
    """Each engine run on `items` over and over in a thread of its own for `seconds` (and
    twice at least): items per second of them all, and CPU ms per item (all threads)."""
    for engine in engines:
        pipeline.run_batch(engine, items)  # warm this shape
    done = [0] * len(engines)
    started, cpu_started = time.perf_counter(), time.process_time()

    def loop(index: int) -> None:
        while time.perf_counter() - started < seconds or done[index] < 2 * len(items):
            pipeline.run_batch(engines[index], items)
            done[index] += len(items)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(len(engines))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    total = sum(done)
    return total / (time.perf_counter() - started), (
        time.process_time() - cpu_started
    ) / total * 1000.0


def measure(
    bundle: Bundle, candidate: Candidate, base: Settings, seconds: float, image: bytes
) -> Measured:
    """The candidate's figures in this process (see the module's doc)."""
    settings = candidate.settings(base)
    result = Measured(candidate, unverified=unverified_precision(bundle, settings))
    pipeline = pipeline_for(bundle.manifest)
    items = pipeline.prepare(decode_image(image, settings.max_pixels)).items
    # A detector runs one image per call; the others batches of items (a segmenter's
    # items are its tiles) as the batcher forms them, of each size batch_sizes gives.
    sizes = [1] if bundle.manifest.task == "detect" else batch_sizes(settings.max_batch_size)
    before = _resident_mib()
    try:
        engines = [engine for engine, _ in instances_of(bundle, settings)]
    except EngineUnavailable as exc:
        result.error = str(exc)
        return result
    try:
        pipeline.run_batch(engines[0], items)
        for size in sizes:
            rate, _ = run_side_by_side(pipeline, engines, (items * size)[:size], seconds)
            result.by_batch[size] = rate / len(items)
        result.batch_size, result.images_per_s = at_recommended_batch(result.by_batch)
        if bundle.manifest.task == "detect":
            result.batch_size = 0  # one image per call: no batch size to recommend
        result.memory_mib = _resident_mib() - before
        result.lone_ms = _lone_ms(pipeline, engines[0], items)
        if candidate.instances > 1 and candidate.threads == 1:
            before_solo = _resident_mib()
            engines.append(create_engine(bundle, settings.for_solo_engine()))
            pipeline.run_batch(engines[-1], items)  # its first run initialises it
            result.solo_lone_ms = _lone_ms(pipeline, engines[-1], items)
            result.solo_memory_mib = _resident_mib() - before_solo
    finally:
        for engine in engines:
            engine.close()
    return result


def batch_sizes(largest: int) -> list[int]:
    """The batch sizes measured under load, smallest first: those a static-shape engine
    compiles for --max-batch-size `largest` (the powers of two below it, and it)."""
    return sorted(static_sizes(largest))


def at_recommended_batch(by_batch: dict[int, float]) -> tuple[int, float]:
    """The smallest batch size whose images/s is within BATCH_NEAR of the best, and its
    images/s."""
    fastest = max(by_batch.values())
    size = min(size for size, rate in by_batch.items() if rate >= (1 - BATCH_NEAR) * fastest)
    return size, by_batch[size]


def _lone_ms(pipeline: Any, engine: Any, items: list[np.ndarray]) -> float:
    """The median of five runs of one image's items, in ms."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        pipeline.run_batch(engine, items)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1000.0


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_in_child(
    model_dir: Path,
    candidate: Candidate,
    base: Settings,
    seconds: float,
    image: Path | None = None,
) -> Measured:
    """`measure` in a fresh Python process; its failure, if any, as the result's error."""
    request = {
        "model_dir": str(model_dir),
        "candidate": asdict(candidate),
        "max_batch_size": base.max_batch_size,
        "seconds": seconds,
        "image": None if image is None else str(image),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service.tuning", json.dumps(request)],
            capture_output=True,
            text=True,
            timeout=MEASURE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return Measured(candidate, error=f"took over {MEASURE_TIMEOUT_S:g} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return Measured(candidate, error=last)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures.pop("candidate")
    figures["by_batch"] = {int(size): rate for size, rate in figures["by_batch"].items()}
    return Measured(candidate, **figures)


def median_of(runs: Sequence[Measured]) -> Measured:
    """One candidate's rounds as one result: the median of each figure, or the first
    error."""
    failed = next((run for run in runs if run.error is not None), None)
    if failed is not None:
        return failed
    by_batch = {
        size: statistics.median(run.by_batch[size] for run in runs) for size in runs[0].by_batch
    }
    batch_size, images_per_s = at_recommended_batch(by_batch)
    return Measured(
        runs[0].candidate,
        images_per_s=images_per_s,
        batch_size=batch_size if runs[0].batch_size else 0,
        by_batch=by_batch,
        lone_ms=statistics.median(run.lone_ms for run in runs),
        memory_mib=statistics.median(run.memory_mib for run in runs),
        solo_lone_ms=statistics.median(run.solo_lone_ms for run in runs),
        solo_memory_mib=statistics.median(run.solo_memory_mib for run in runs),
        unverified=runs[0].unverified,
    )


def best(results: Sequence[Measured]) -> Measured | None:
    """The fastest under load among those that ran and that the bundle was verified for."""
    servable = [r for r in results if r.error is None and r.unverified is None]
    return max(servable, key=lambda r: r.images_per_s, default=None)


def report(
    results: Sequence[Measured], model_dir: Path, default: Candidate, model: str | None = None
) -> str:
    """The table, fastest first, "vs default" against `default` (what `hornet serve`
    runs here without flags), and the flags of the fastest verified candidate (and its
    --model-setting form for `model`, the bundle's name; default the directory's)."""
    model = model or model_dir.name
    baseline = next(
        (r.images_per_s for r in results if r.error is None and r.candidate == default), 0.0
    )
    lines = [
        f"{'candidate':<46} {'img/s':>7} {'batch':>5} {'vs default':>10} {'lone ms':>8} "
        f"{'MiB':>6}  note",
    ]
    for result in sorted(results, key=lambda r: -r.images_per_s):
        if result.error is not None:
            lines.append(f"{result.candidate.name:<46} {'-':>7} {'':>5} {'':>10} {'':>8} "
                         f"{'':>6}  cannot run here: {result.error}")  # fmt: skip
            continue
        ratio = f"{result.images_per_s / baseline:.2f}x" if baseline else "-"
        note = "unverified (below)" if result.unverified else ""
        lines.append(
            f"{result.candidate.name:<46} {result.images_per_s:>7.1f} "
            f"{result.batch_size or '-':>5} {ratio:>10} {result.lone_ms:>8.1f} "
            f"{result.memory_mib:>6.0f}  {note}".rstrip()
        )
    reasons = dict.fromkeys(r.unverified for r in results if r.unverified and r.error is None)
    lines += [f"unverified, not recommended: {reason}" for reason in reasons]
    chosen = best(results)
    if chosen is None:
        lines.append("no verified candidate ran here")
    else:
        values = serve_values(chosen)
        environment = " ".join(
            f"{k}={v}" for k, v in settings_environment(Settings, values).items()
        )
        flags = " ".join(settings_flags(Settings, values))
        lines.append(
            f"\nfastest verified under load: {chosen.candidate.name}"
            + (f", batches of up to {chosen.batch_size}" if chosen.batch_size else "")
            + f"\n  hornet serve --model-dir {model_dir} {flags}\n"
            f"  or in the environment (a container's, k8s serve.env): {environment}\n"
            "  or for this model alone, in a server of several: "
            + " ".join(f"--model-setting {text}" for text in model_setting_texts(model, values))
        )
        if len(chosen.by_batch) > 1:
            lines.append(
                "  its images/s by batch size: "
                + "  ".join(f"{size}={rate:.1f}" for size, rate in chosen.by_batch.items())
                + f" (the smallest within {BATCH_NEAR:.0%} of the best: a smaller batch "
                "is answered sooner)"
            )
        close = [
            r.candidate.name
            for r in results
            if r is not chosen and r.error is None and r.unverified is None
            and r.images_per_s >= (1 - NEAR) * chosen.images_per_s
        ]  # fmt: skip
        if chosen.solo_lone_ms and chosen.solo_lone_ms < chosen.lone_ms:
            lines.append(
                f"  with --solo-engine a lone request takes {chosen.solo_lone_ms:.1f} ms "
                f"instead of {chosen.lone_ms:.1f} (one more engine, over all the CPUs, "
                f"{chosen.solo_memory_mib:.0f} MiB; the same under load):\n"
                f"  hornet serve --model-dir {model_dir} {flags} --solo-engine"
            )
        if close:
            lines.append(
                f"within {NEAR:.0%} of it (as fast, within a shared host's noise; more "
                f"--rounds tell them apart): {'; '.join(close)}"
            )
        quickest = min(
            (r for r in results if r.error is None and r.unverified is None),
            key=lambda r: r.lone_ms,
        )
        solo_as_quick = 0 < chosen.solo_lone_ms <= (1 + NEAR) * quickest.lone_ms
        if quickest is not chosen and not solo_as_quick:
            lines.append(
                f"quickest for a lone request: {quickest.candidate.name} "
                f"({quickest.lone_ms:.1f} ms against {chosen.lone_ms:.1f})\n"
                f"  hornet serve --model-dir {model_dir} {' '.join(quickest.candidate.flags())}"
            )
    return "\n".join(lines)


def serve_values(result: Measured) -> dict[str, Any]:
    """The settings `hornet serve` is told for a measured candidate (field -> value): its
    engine, precision and layout, and the batch size recommended for it (none for a
    detector)."""
    batch = {"max_batch_size": result.batch_size} if result.batch_size else {}
    return result.candidate.values() | batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", type=Path, nargs="+",
        help="the bundle to measure; several: each measured alone, in turn, then one "
        "command serving them all with each one's pick as --model-setting",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=_positive_seconds, default=1.5,
        help="load per candidate and batch size (default 1.5)",
    )  # fmt: skip
    parser.add_argument(
        "--max-batch-size", type=int, default=Settings.model_fields["max_batch_size"].default,
        help="the largest batch measured under load (images; a segmenter's tiles), and the "
        "powers of two below it (default 8)",
    )  # fmt: skip
    parser.add_argument(
        "--engines", type=_engine_names, default="onnxruntime,openvino",
        help="comma-separated (default both)",
    )  # fmt: skip
    parser.add_argument(
        "--image", type=Path,
        help="a picture like those it will serve (default: a synthetic one without "
        "objects; a detector's speed depends on what it finds)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=_positive_count, default=1,
        help="measure every candidate this many times, in turn, and take the medians "
        "(a shared host's speed moves 10-20%% between runs; default 1)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="the figures as JSON lines")


TUNED_ENGINES = ("onnxruntime", "openvino")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds of load, above 0 and finite")
    return value


def _positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, at least 1")
    return value


def _engine_names(text: str) -> str:
    unknown = sorted(set(text.split(",")) - set(TUNED_ENGINES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, unknown))}: the engines measured are {', '.join(TUNED_ENGINES)}"
        )
    return text


def tune(args: argparse.Namespace) -> int:
    try:  # the server's settings the candidates are measured under (the environment's)
        base = Settings(max_batch_size=args.max_batch_size)
    except ValidationError as exc:
        for problem in settings_problems(Settings, exc):
            print(f"hornet tune: invalid setting: {problem}", file=sys.stderr)
        return 2
    if args.image is not None:  # once here, not as each candidate's failure
        try:
            decode_image(args.image.read_bytes(), base.max_pixels, base.max_aspect_ratio)
        except (OSError, ServiceError) as exc:
            print(f"hornet tune: --image {args.image}: {exc}", file=sys.stderr)
            return 2
    picks: list[tuple[Path, str, Measured | None]] = []
    for model_dir in args.model_dir:
        name, results = tune_bundle(model_dir, args, base)
        picks.append((model_dir, name, best(results)))
    if len(picks) > 1 and not args.json:
        print(combined(picks))
    return 0 if all(pick is not None for _, _, pick in picks) else 1


def tune_bundle(
    model_dir: Path, args: argparse.Namespace, base: Settings
) -> tuple[str, list[Measured]]:
    """Every candidate for the bundle at `model_dir` measured under the server's settings
    `base`, its report printed (or its figures as JSON lines); the bundle's name and the
    results."""
    bundle = load_bundle(model_dir)
    cpus = available_cpus()
    wanted = set(args.engines.split(","))
    found = [c for c in candidates(bundle, cpus) if c.engine in wanted]
    print(
        f"{bundle.name} ({bundle.manifest.task}): {len(found)} candidates on {cpus} CPUs, "
        f"{args.seconds:g} s of load each in batches of "
        f"{1 if bundle.manifest.task == 'detect' else batch_sizes(args.max_batch_size)} items",
        file=sys.stderr,
        flush=True,
    )
    rounds: list[list[Measured]] = [[] for _ in found]
    for round_ in range(1, args.rounds + 1):  # each round every candidate once, in turn
        for runs, candidate in zip(rounds, found, strict=True):
            runs.append(measure_in_child(model_dir, candidate, base, args.seconds, args.image))
            print(f"  round {round_}: {candidate.name}", file=sys.stderr, flush=True)
    results = [median_of(runs) for runs in rounds]
    if args.json:
        for result in results:
            print(json.dumps({"model": bundle.name, **asdict(result)}), flush=True)
    else:
        # the server's default: ONNX Runtime fp32, one engine of all the CPUs
        default = Candidate("onnxruntime", "fp32", 1, cpus)
        print(report(results, model_dir, default, bundle.name))
    return bundle.name, results


def combined(picks: Sequence[tuple[Path, str, Measured | None]]) -> str:
    """One `hornet serve` command for every bundle measured, each with its fastest
    verified candidate as --model-setting (a bundle without one keeps the server's
    settings, and says so)."""
    words = ["hornet", "serve"]
    for model_dir, _, _ in picks:
        words += ["--model-dir", str(model_dir)]
    texts, notes = [], []
    for _, name, pick in picks:
        if pick is None:
            notes.append(
                f"  {name}: no verified candidate ran here; it keeps the server's settings"
            )
            continue
        texts += model_setting_texts(name, serve_values(pick))
    words += [part for text in texts for part in ("--model-setting", text)]
    return "\n".join(
        [
            "\nall of them in one server, each with its pick (each was measured alone: "
            "under load on several at once they share the CPUs):",
            "  " + " ".join(shlex.quote(word) for word in words),
            "  or in the environment: HORNET_MODEL_SETTINGS=" + shlex.quote(",".join(texts)),
            *notes,
        ]
    )


tune_command = Command(
    help="measure which engine, precision and layout serve a bundle fastest here",
    description=__doc__,
    add_arguments=add_arguments,
    run=tune,
)


def _child(request: dict) -> None:
    candidate = Candidate(**request["candidate"])
    base = Settings(max_batch_size=request["max_batch_size"])
    bundle = load_bundle(Path(request["model_dir"]))
    image = Path(request["image"]).read_bytes() if request["image"] else photo()
    result = measure(bundle, candidate, base, request["seconds"], image)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
