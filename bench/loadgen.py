"""Load generator for `hornet serve`: throughput and latency per concurrency, against the
raw engine throughput of the same bundle measured in the same run.

    python bench/loadgen.py --model-dir bundles/hornet_tiny_7x7 --concurrency 1,4,8,16

Steps, one after the other so they do not compete for the CPU:
  1. the server: `python -m service` started on a free loopback port (or --url of one
     already running, loopback only), then warmed up;
  2. raw engine: the bundle's engine, exactly as the service builds it (its --instances
     engines side by side, each in a thread of its own), run on preprocessed inputs at
     batch sizes 1..max-batch-size, ONNX Runtime's threads spinning during runs only (as
     the service's do) and between runs too (`+spin`); and at the two largest batch sizes
     in the other layouts of the cores (one engine on all of them, `@1xN`; one
     single-thread engine per core, `@Nx1`), so that the reference is the fastest the
     bundle runs here, whatever the server's layout (with --device cuda: the server's
     layout, then 4 engines side by side at the two largest sizes, `@4x`); in this
     process while the server is paused (SIGSTOP; one started here);
  3. for each concurrency: that many client tasks, each POSTing the image and waiting for
     its answer, for --duration seconds or --requests requests, whichever ends first.
The ratio printed is server images/s / best raw engine images/s (1.0 = no overhead).
Beside it, where the CPU went per image: the server's (one started here), split by its
threads' names (service.thread_names: `engine` the engines and the threads they started,
`decode`, `loop` the event loop's thread, `other`), the clients' (this process), the raw
engine's at the reference configuration; the mean batch and the engines' busy share;
and the CPU-bound ceiling: where the raw engine keeps every CPU busy, the most of its
images/s any server can deliver beside those other threads and the clients on the same
CPUs (`cpu_bound_ceiling`); and, from the server's statistics (/v2/models/stats), where a
request's wall time went there: decoding and preprocessing (input), waiting for its batch
(queue), its batch's engine run (engine) and shaping the answer.

With --rounds N, steps 2 and 3 repeat N times, so that each server figure has raw engine
figures measured next to it in time (a shared host's speed drifts by 10% or more within
minutes), in turn: even rounds load the server first, then measure the raw engine. The
summary then takes as the reference the raw configuration with the highest median over
the rounds, not the single luckiest measurement (the best of ten noisy
figures overstates the engine), and prints the median and range of the per-round ratios
of the server to that configuration measured in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from hornet_bundle import load_bundle
from service import thread_names
from service.engines import create_engine, instances_of
from service.flags import add_settings_flags, settings_flags
from service.pipelines import pipeline_for
from service.settings import Settings
from service.testing import ServerNotReady, running_server, wait_ready
from service.tuning import run_side_by_side

# Bundles too big for a CPU, or TensorRT engines built at start-up, take minutes to load.
READY_TIMEOUT_S = 300


@dataclass
class LoadResult:
    concurrency: int
    ok: int
    errors: dict[int, int]
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return float(np.percentile(self.latencies, q)) * 1000.0


def test_image(size: tuple[int, int]) -> bytes:
    """A JPEG photo (scikit-image's chelsea when installed, else a smooth synthetic)."""
    try:
        from skimage import data

        image = Image.fromarray(data.chelsea())
    except ImportError:
        y, x = np.mgrid[0:300, 0:451]
        image = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# Engines run side by side for the raw reference on a GPU, besides the server's layout.
GPU_INSTANCES = 4


def raw_layouts(
    settings: Settings, cpus: int, one_per_call: bool = False
) -> list[tuple[tuple[int, int], bool, list[int], str]]:
    """((instances, threads), spinning, batch sizes, tag) for each raw-engine run; batch
    size 1 alone for an engine that takes one image per call (`one_per_call`: the
    detector, whose batches the pipeline runs as a loop).

    On the CPU: the server's layout at every even batch size with ONNX Runtime's threads
    spinning between runs and not, then the two largest sizes in the other layouts of the
    cores (one engine on all of them, `@1xN`; a single-thread engine per core, `@Nx1`).
    On CUDA the threads' layout and spinning only touch the few nodes left on the CPU, and
    each engine built there plans its convolutions again (the fp16 graph about 7 s per
    static session on an H200: 16 engines did not finish in 4 minutes), so: the server's
    layout at every size, and `GPU_INSTANCES` engines side by side at the two largest
    (the GPU running several batches at once)."""
    largest = 1 if one_per_call else settings.max_batch_size
    batches = sorted({1, *range(2, largest + 1, 2), largest})
    top = sorted({max(1, largest // 2), largest})
    served = (settings.instances, settings.engine_threads)
    if settings.device == "cuda":
        layouts = [(served, settings.engine_spinning, batches, "")]
        if settings.instances != GPU_INSTANCES:
            other = (GPU_INSTANCES, settings.engine_threads)
            layouts.append((other, settings.engine_spinning, top, f"@{GPU_INSTANCES}x"))
        return layouts
    layouts = [(served, spinning, batches, "") for spinning in (False, True)]
    for other in ((1, 0), (cpus, 1)):
        if other != served and not (other == (1, 0) and served == (1, cpus)):
            tag = f"@{other[0]}x{other[1] or cpus}"
            layouts.append((other, settings.engine_spinning, top, tag))
    return layouts


def raw_engine_throughput(
    model_dir: Path, image: bytes, settings: Settings, seconds: float
) -> dict[str, float]:
    """images/s of the bare engine, on the image as the service prepares it (its items:
    one for a classifier or a detector, a segmenter's tiles; batch sizes count items),
    laid out as the server's (its --instances engines of --engine-threads threads,
    running side by side) and in the other layouts `raw_layouts` gives. The best of these
    is the reference: a server is measured against the fastest its hardware can go, not
    only its own layout."""
    from service.imaging import decode_image

    bundle = load_bundle(model_dir)
    pipeline = pipeline_for(bundle.manifest)
    items = pipeline.prepare(decode_image(image, settings.max_pixels)).items
    one_per_call = bundle.manifest.task == "detect"
    results = {}
    cpus = len(os.sched_getaffinity(0))
    for (instances, threads), spinning, sizes, tag in raw_layouts(settings, cpus, one_per_call):
        layout = settings.model_copy(
            update={"engine_spinning": spinning, "engine_threads": threads, "instances": instances}
        )
        engines = [engine for engine, _ in instances_of(bundle, layout)]
        for batch in sizes:
            key = f"b{batch}{'+spin' if spinning and not tag else ''}{tag}"
            batch_items = (items * batch)[:batch]
            rate, cpu_ms = run_side_by_side(pipeline, engines, batch_items, seconds)
            # per image: a segmenter's image is len(items) tiles
            results[key], RAW_CPU_MS[key] = rate / len(items), cpu_ms * len(items)
        for engine in engines:
            engine.close()
    return results


# CPU milliseconds per image of each raw_engine_throughput configuration (all threads).
RAW_CPU_MS: dict[str, float] = {}


def process_tree(root: int) -> list[int]:
    """`root` and its descendants now (/proc, Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _cpu_ticks(stat: Path) -> int:
    """User + system clock ticks of the process or thread whose /proc `stat` file it is."""
    fields = stat.read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of the processes among `pids` still running."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            ticks += _cpu_ticks(Path(f"/proc/{pid}/stat"))
    return ticks / os.sysconf("SC_CLK_TCK")


# The server's threads by the names service.thread_names gives them (Linux), and the
# roles loadgen reports, any other name counted as `other`.
THREAD_ROLES = {
    thread_names.ENGINE: "engine",
    thread_names.DECODE: "decode",
    thread_names.SERVE: "loop",
}
ROLES = (*THREAD_ROLES.values(), "other")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time so far of `pid`'s threads, summed by role: the engines and the threads
    they started (`engine`), decoding (`decode`), the event loop's thread and the helpers
    it started (`loop`), any other (`other`); the server names its threads
    (service.thread_names), so a thread that has ended is no longer counted.

    Each thread's time is its run time in nanoseconds (`schedstat`), where the kernel has
    it: its user + system ticks are each rounded down to 10 ms, so over a few images the
    threads' ticks could add up to several more than the process's own count."""
    seconds = dict.fromkeys(ROLES, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                role = THREAD_ROLES.get((task / "comm").read_text().rstrip("\n"), "other")
                try:
                    seconds[role] += int((task / "schedstat").read_text().split()[0]) / 1e9
                except FileNotFoundError:  # a kernel without scheduler statistics
                    seconds[role] += _cpu_ticks(task / "stat") / tick
    return seconds


def memory_mib(pids: list[int]) -> float:
    """The proportional set size (PSS) of the processes among `pids` still running, in
    MiB: each page shared between them (a forked worker's copy of its parent's pages, the
    libraries) counted once over all, where a sum of their RSS would count it in each."""
    kib = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    kib += int(line.split()[1])
                    break
    return kib / 1024


# The stages of a request in the server, as its statistics extension counts them.
STAGES = ("compute_input", "queue", "compute_infer", "compute_output")


def server_counters(url: str) -> dict[str, float]:
    """The server's batch and engine-time counters, summed over its models (/metrics),
    and its successful requests' time in each stage (Triton's statistics extension,
    /v2/models/stats; absent from a server without it)."""
    wanted = ("hornet_batch_size_sum", "hornet_batch_size_count", "hornet_engine_seconds_sum")
    totals = dict.fromkeys(wanted, 0.0)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    stats = httpx.get(f"{url}/v2/models/stats", timeout=10)
    if stats.status_code == 200:
        models = [m["inference_stats"] for m in stats.json()["model_stats"]]
        totals["stats_requests"] = float(sum(m["success"]["count"] for m in models))
        for stage in STAGES:
            totals[f"stats_{stage}_ns"] = float(sum(m[stage]["ns"] for m in models))
    return totals


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"loadgen only targets loopback addresses; {url!r} is not one")


def require_same_engine(
    url: str, model: str | None, model_dir: Path, settings: Settings, task: str
) -> None:
    """A server given by --url must run the engine the raw reference builds from this
    run's flags (the same runtime, provider, precision and file), or "vs engine" would
    compare two different engines: a CUDA server against the CPU engine, say."""
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
    # Without --model, the task's route answers with the server's model of that task.
    served = next(
        (m for m in models if m["name"] == model or (model is None and m["task"] == task)),
        None,
    )
    if served is None:
        raise SystemExit(f"the server at {url} serves no {task} model named {model!r}")
    engine = create_engine(load_bundle(model_dir), settings)
    try:
        here = engine.description
    finally:
        engine.close()
    if served["engine"] != here:
        raise SystemExit(
            f"the server at {url} runs {served['engine']!r} but the raw reference would run "
            f"{here!r}: give loadgen the server's --engine, --device and --precision"
        )


# The server's settings the benchmark sets, flags and defaults taken from Settings.
SERVER_SETTINGS = (
    "max_batch_size", "max_delay_ms", "close_batches_early", "max_queue_size", "instances",
    "engine_threads", "solo_engine", "device", "precision", "engine", "decode_threads",
    "decode_nice", "jpeg_reducing_gap", "image_cache_mib",
    "engine_spinning", "openvino_static_shapes", "cuda_static_shapes", "cuda_conv_algo_search",
    "http_parser", "event_loop",
)  # fmt: skip
# A deeper queue than the server's default, so that no level of load is refused; a
# precision named, for the peers in bench/peers.py to run the same one.
SERVER_DEFAULTS = {"max_queue_size": 256, "precision": "fp32"}


def server_values(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark's settings of the server, by their Settings names."""
    return {name: getattr(args, name) for name in SERVER_SETTINGS}


def server_flags(args: argparse.Namespace) -> list[str]:
    """The `python -m service` flags for the benchmark's settings."""
    return [
        "--model-dir", str(args.model_dir), "--log-level", "warning",
        *settings_flags(Settings, server_values(args)),
    ]  # fmt: skip


@contextlib.contextmanager
def serving(
    url: str | None, flags: list[str], **options: Any
) -> Iterator[tuple[str, subprocess.Popen | None]]:
    """A ready server's URL and process: the one at `url` (loopback only; no process),
    else `python -m service *flags` started for the run (`options` go to
    service.testing.running_server) and stopped after it. A server that never gets ready
    ends the run with the reason."""
    try:
        if url is not None:
            require_loopback(url)
            wait_ready(url, timeout_s=READY_TIMEOUT_S)
            yield url, None
            return
        with running_server(flags, ready_timeout_s=READY_TIMEOUT_S, **options) as server:
            yield server.url, server.process
    except ServerNotReady as exc:
        raise SystemExit(str(exc)) from exc


# The route each task's requests go to, and its query (a classifier's top class only).
ROUTES = {
    "classify": ("/classify", {"top_k": 1}),
    "segment": ("/segment", {}),
    "detect": ("/detect", {}),
}


async def run_load(
    url: str,
    image: bytes,
    model: str | None,
    concurrency: int,
    seconds: float,
    limit: int,
    task: str = "classify",
) -> LoadResult:
    """`concurrency` closed-loop clients on `task`'s route for `seconds` or `limit`
    requests in all."""
    path, query = ROUTES[task]
    params = {**query, **({"model": model} if model else {})}
    return await closed_loop(url, path, image, params, concurrency, seconds, limit)


async def closed_loop(
    url: str,
    path: str,
    image: bytes,
    params: dict[str, Any],
    concurrency: int,
    seconds: float,
    limit: int,
) -> LoadResult:
    """`concurrency` clients, each POSTing `image` (a raw image/jpeg body) to `url``path`
    and waiting for the answer, for `seconds` or `limit` requests in all; the latencies
    of the 200 answers, the other statuses counted.

    The clients are aiohttp's: on the same cores as the server they measure, they take
    0.6 ms of CPU per request where httpx's took 2.6 (bench/README.md, server efficiency).
    """
    headers = {"content-type": "image/jpeg"}
    query = {key: str(value) for key, value in params.items()}
    latencies: list[float] = []
    errors: dict[int, int] = {}
    issued = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        started = time.perf_counter()
        stop_at = started + seconds

        async def client_loop() -> None:
            nonlocal issued
            while time.perf_counter() < stop_at and issued < limit:
                issued += 1
                sent = time.perf_counter()
                async with client.post(path, params=query, data=image, headers=headers) as answer:
                    await answer.read()
                    status = answer.status
                if status == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors[status] = errors.get(status, 0) + 1

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return LoadResult(concurrency, len(latencies), errors, elapsed, latencies)


async def warm(url: str, image: bytes, model: str | None, task: str, count: int = 8) -> None:
    await run_load(url, image, model, concurrency=4, seconds=60, limit=count, task=task)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings `server_flags` passes to `python -m service`, as `hornet serve` has
    them (help, choices), defaulting to the server's defaults but for SERVER_DEFAULTS."""
    add_settings_flags(parser, Settings, only=SERVER_SETTINGS, defaults=SERVER_DEFAULTS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, required=True, help="a bundle: classifier, segmenter, detector"
    )
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    parser.add_argument("--model", help="?model= when the server has several of the task")
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    parser.add_argument("--requests", type=int, default=2000, help="request cap per level")
    parser.add_argument("--engine-seconds", type=float, default=5.0, help="per batch size")
    parser.add_argument("--image-size", default="384x256", help="upload WxH (JPEG)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="raw engine + load levels, repeated (see above)"
    )
    add_server_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    image = test_image((width, height))
    levels = [int(c) for c in args.concurrency.split(",")]
    task = load_bundle(args.model_dir).manifest.task
    settings = Settings(
        model_dir=[args.model_dir], max_batch_size=args.max_batch_size,
        engine_threads=args.engine_threads, device=args.device, precision=args.precision,
        engine=args.engine, instances=args.instances, engine_spinning=args.engine_spinning,
        openvino_static_shapes=args.openvino_static_shapes,
        cuda_static_shapes=args.cuda_static_shapes,
        cuda_conv_algo_search=args.cuda_conv_algo_search,
        allow_unverified_precision=True,  # the server refuses or allows it; not timing's concern
    )  # fmt: skip
    print(f"bundle {args.model_dir} ({task})  image {width}x{height} JPEG ({len(image)} bytes)  "
          f"cpus {os.cpu_count()}  {args.engine} {args.device}/{args.precision}  "
          f"engine/decode threads {args.engine_threads}/{args.decode_threads}")  # fmt: skip
    raws: list[dict[str, float]] = []
    served: dict[int, list[float]] = {level: [] for level in levels}
    with serving(args.url, server_flags(args)) as (url, process):
        asyncio.run(warm(url, image, args.model, task))
        if args.url is not None:
            require_same_engine(url, args.model, args.model_dir, settings, task)
        print(f"server {url}  max_batch_size {args.max_batch_size}  "
              f"max_delay_ms {args.max_delay_ms}  instances {args.instances}  "
              f"spinning {args.engine_spinning}")  # fmt: skip
        for round_ in range(1, args.rounds + 1):
            loads: list[tuple[int, LoadResult, dict[str, float]]] = []
            steps = round_order(("raw", "load"), round_)
            for step in steps:
                if step == "raw":
                    with paused(process):
                        raw = raw_engine_throughput(
                            args.model_dir, image, settings, args.engine_seconds
                        )
                else:
                    loads = [load_level(url, process, image, args, task, lv) for lv in levels]
            raws.append(raw)
            best_batch = max(raw, key=raw.get)
            print(("" if args.rounds == 1 else f"round {round_}"
                   + (" (the server first)" if steps[0] == "load" else "") + ": ")
                  + "raw engine images/s by batch: "
                  + "  ".join(f"{b}={v:.1f}" for b, v in raw.items())
                  + f"  (best {best_batch} = {raw[best_batch]:.1f})")  # fmt: skip
            print(f"{'conc':>5} {'ok':>6} {'errors':>10} {'img/s':>8} {'p50 ms':>8} "
                  f"{'p95 ms':>8} {'p99 ms':>8} {'vs engine':>9}  where the CPU went")  # fmt: skip
            for level, result, spent in loads:
                served[level].append(result.throughput)
                errors = ",".join(f"{k}:{v}" for k, v in sorted(result.errors.items())) or "-"
                print(
                    f"{level:>5} {result.ok:>6} {errors:>10} {result.throughput:>8.1f} "
                    f"{result.percentile(50):>8.1f} {result.percentile(95):>8.1f} "
                    f"{result.percentile(99):>8.1f} {result.throughput / raw[best_batch]:>9.3f}  "
                    + _where(spent, result, RAW_CPU_MS[best_batch])
                )
    if args.rounds > 1:
        print(summary(raws, served))
    return 0


T = TypeVar("T")


def round_order(steps: Sequence[T], round_: int) -> list[T]:
    """A round's steps (the raw engine and the load here; the servers in bench/peers.py)
    in the order given in odd rounds, reversed in even ones: on a host whose speed drifts
    during the rounds (by up to a quarter over a few minutes), the first step of every
    round would otherwise always run in the slower part."""
    return list(steps) if round_ % 2 else list(reversed(steps))


def load_level(
    url: str,
    process: subprocess.Popen | None,
    image: bytes,
    args: argparse.Namespace,
    task: str,
    level: int,
) -> tuple[int, LoadResult, dict[str, float]]:
    """One concurrency level's load on the server: the level, its result, and what the
    server and the clients spent meanwhile (`_accounting`'s counters, differenced)."""
    before = _accounting(url, process, opening=True)
    result = asyncio.run(
        run_load(url, image, args.model, level, args.duration, args.requests, task)
    )
    after = _accounting(url, process, opening=False)
    return level, result, {k: v - before[k] for k, v in after.items()}


def summary(raws: list[dict[str, float]], served: dict[int, list[float]]) -> str:
    """The reference configuration (highest median raw images/s over the rounds) and, per
    concurrency, the median and range of server / that configuration in the same round."""
    medians = {key: float(np.median([raw[key] for raw in raws])) for key in raws[0]}
    reference = max(medians, key=medians.get)
    lines = [
        f"over {len(raws)} rounds: raw engine medians "
        + "  ".join(f"{k}={v:.1f}" for k, v in medians.items())
        + f"  (reference {reference} = {medians[reference]:.1f})"
    ]
    for level, throughputs in served.items():
        ratios = [t / raw[reference] for t, raw in zip(throughputs, raws, strict=True)]
        luckiest = [t / max(raw.values()) for t, raw in zip(throughputs, raws, strict=True)]
        lines.append(
            f"conc {level}: server {np.median(throughputs):.1f} img/s (median), vs {reference} "
            f"in the same round {np.median(ratios):.3f} (median; {min(ratios):.3f}-"
            f"{max(ratios):.3f}), vs the best single raw figure of each round "
            f"{np.median(luckiest):.3f}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def paused(process: subprocess.Popen | None) -> Iterator[None]:
    """The server's processes stopped (SIGSTOP) for the block, so an idle server's timers
    take nothing from the raw engine; a server not started here runs on."""
    pids = process_tree(process.pid) if process is not None else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _accounting(url: str, process: subprocess.Popen | None, *, opening: bool) -> dict[str, float]:
    """The counters at the start (`opening`) or the end of a level. The server's threads
    and its whole process cannot be read at one instant, and the server still works
    between the two reads (the answers to these very /metrics and statistics requests
    are still being logged): so the whole is read first at the start and last at the
    end, and the span it covers holds the threads' span (read the other way round at the
    start, the server's work between the two reads would be counted in its parts and not
    in the whole). /proc rounds the whole's user and system times each down to a tick."""
    counters = server_counters(url)
    counters["client_cpu"] = time.process_time()
    if process is None:
        counters["server_cpu"] = float("nan")
        return counters
    if opening:
        counters["server_cpu"] = cpu_seconds([process.pid])
    for role, seconds in thread_cpu_seconds(process.pid).items():
        counters[f"server_cpu_{role}"] = seconds
    if not opening:
        counters["server_cpu"] = cpu_seconds([process.pid])
    return counters


def _where(spent: dict[str, float], result: LoadResult, raw_cpu_ms: float) -> str:
    """Per image: the server's CPU ms (all threads, then by their role), the client's, the
    raw engine's best configuration's; the mean batch, and the share of the run the engine
    was busy."""
    images = max(result.ok, 1)
    batches = max(spent["hornet_batch_size_count"], 1)
    # A server given by --url is not this run's process: its CPU time is not measured.
    server_ms = spent["server_cpu"] / images * 1000
    server = "CPU not measured" if math.isnan(server_ms) else f"{server_ms:.1f} ms/img"
    roles = [(role, spent.get(f"server_cpu_{role}")) for role in ROLES]
    client_ms = spent["client_cpu"] / images * 1000
    bound = ""
    if all(seconds is not None for _, seconds in roles):
        server += " (" + ", ".join(f"{r} {s / images * 1000:.1f}" for r, s in roles) + ")"
        beside = sum(s for r, s in roles if r != "engine") / images * 1000 + client_ms
        bound = f"; CPU-bound ceiling {cpu_bound_ceiling(raw_cpu_ms, beside):.3f}"
    requests = spent.get("stats_requests", 0.0)
    stages = ""
    if requests > 0:
        ms = {stage: spent[f"stats_{stage}_ns"] / requests / 1e6 for stage in STAGES}
        stages = (
            f"; a request's wall ms in the server: input {ms['compute_input']:.1f}, queue "
            f"{ms['queue']:.1f}, engine {ms['compute_infer']:.1f}, answer "
            f"{ms['compute_output']:.1f}"
        )
    return (
        f"server {server}, "
        f"client {client_ms:.1f}, raw engine {raw_cpu_ms:.1f}; "
        f"batch {spent['hornet_batch_size_sum'] / batches:.1f}, engine busy "
        f"{spent['hornet_engine_seconds_sum'] / result.seconds:.0%}{bound}{stages}"
    )


def cpu_bound_ceiling(raw_cpu_ms: float, beside_ms: float) -> float:
    """The most of the raw engine's images/s a server can deliver where the raw engine
    keeps every CPU busy and the clients share them: each image also costs `beside_ms` of
    CPU outside the engine (the server's other threads and the clients), so with the
    engine's CPU per image at its bare best, `raw_cpu_ms`, the CPUs serve
    raw / (raw + beside) of its images. A ratio near it is the hardware's limit, not the
    server's; below it, the engine costs more in the server (smaller batches, threads
    sharing its cores)."""
    return raw_cpu_ms / (raw_cpu_ms + beside_ms)


if __name__ == "__main__":
    # `kill` or a timeout unwinds as Ctrl-C does, so the servers started here stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
