"""Our server against TorchServe and LitServe: the same closed-loop HTTP load on each, in
alternating rounds, and the ratios (issue P11, item 5).

    python bench/peers.py --concurrency 8 --duration 30 --rounds 5
    python bench/peers.py --model-dir BUNDLE --checkpoint FILE --engine openvino

One set of weights for all three. Without --checkpoint the variant (--variant, default
hornet_tiny_7x7) gets seeded random weights (the recipe of tests/helpers/dense_tiny.py
`randomize_`, --seed), saved as a checkpoint file; the bundle is exported from that file
(model_export.export, verified against torch) unless --model-dir names a bundle whose
manifest records that file's sha256. Speed does not depend on the weights' values.
  ours: `python -m service --model-dir BUNDLE`, started as bench/loadgen.py starts it,
      with its server flags (--engine, --precision, --instances, --engine-threads,
      --max-batch-size, --max-delay-ms, ...);
  TorchServe: the torch model built from the checkpoint, traced to TorchScript, archived
      with the stock `image_classifier` handler and an index_to_name.json of the bundle's
      labels; --torchserve-workers workers (default --instances) of OMP_NUM_THREADS =
      --torchserve-threads (default the engine threads), batch size --max-batch-size,
      max_batch_delay --torchserve-delay-ms;
  LitServe: bench/peer_litserve.py, our transform and our engine (built by
      service.engines from the same --engine, --precision and threads), --instances
      inference workers, max_batch_size --max-batch-size, batch_timeout
      --litserve-timeout-ms: the same engine behind another server.
  ours-alt (only when named in --servers): ours again with --alt-flags added, to measure
      one of our settings side by side in the same rounds, e.g. --servers ours,ours-alt
      --alt-flags "--http-parser h11 --event-loop asyncio" (one flag alone takes an "=":
      --alt-flags=--no-close-batches-early).
The peers run from the virtualenv that tools/make_peers_env.sh makes (--peers-venv,
default .venv-peers); this script runs from the project's .venv.

All three servers are started first and stay up. Each answers the image once and the
answers are compared before anything is timed: the same top-1 label from all three,
and from LitServe our top-5 labels and scores (the same engine); otherwise the run
stops. Each is warmed up (--warmup requests, then 10 s windows of load until its CPU
per image stops falling: TorchServe's TorchScript model took 0.41 s per image in the
first round of one run and 0.23 in the sixth), and the CPU each takes with no requests
is printed. Then per concurrency level, --rounds rounds of
ours, TorchServe, LitServe in turn (the order reversed every other round), each run
--duration seconds of that many clients
POSTing the same raw JPEG body and waiting for the answer, the other two servers paused
(SIGSTOP) meanwhile. Printed per run: ok, errors, img/s, p50/p95/p99, the CPU seconds
per image of the server's processes and their memory at the run's end (PSS: pages shared
between a server's processes counted once; TorchServe's Java frontend and Python
workers, LitServe's workers and ours all summed over their process trees); at the end,
per server the medians over the rounds, and ours / peer for img/s, p99 and memory (the
median of the per-round ratios, with their range).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers.dense_tiny: the seeded weights' recipe

from loadgen import (  # noqa: E402
    READY_TIMEOUT_S,
    LoadResult,
    add_server_arguments,
    closed_loop,
    cpu_seconds,
    memory_mib,
    process_tree,
    round_order,
    server_flags,
    serving,
    test_image,
)

from hornet_bundle import load_bundle, sha256_of  # noqa: E402
from service.testing import LOOPBACK, ServerNotReady, free_port, wait_ready  # noqa: E402

SERVERS = ("ours", "torchserve", "litserve")
# Not run unless named in --servers: ours again with --alt-flags added (last one wins).
ALT = "ours-alt"
TOP_K = 5
WARM_WINDOW_S = 10.0  # warm-up windows, until the CPU per image settles
SCORE_TOLERANCE = 1e-4  # ours vs LitServe: one graph, one runtime, batches composed apart
# What TorchServe's stock image_classifier handler does to an image, whatever the model.
STOCK_HANDLER_CROP = (224, 224)
STOCK_HANDLER_RESIZE = 256
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TS_MODEL = "hornet"


@dataclass
class Server:
    """A ready server under test: where to POST the image, how to read its top-5."""

    name: str
    url: str
    path: str
    params: dict
    pid: int  # the root of its process tree
    top_k: Callable[[dict], list[tuple[str, float]]]


# ---------------------------------------------------------------- weights and bundle


def seeded_checkpoint(variant: str, seed: int, path: Path) -> None:
    """The variant with seeded, trained-like random weights, saved as a state dict."""
    import torch

    from model_export import create_model
    from tests.helpers.dense_tiny import randomize_

    model = randomize_(create_model(variant), seed)
    torch.save({"state_dict": model.state_dict()}, path)


def export_bundle(variant: str, checkpoint: Path, out: Path) -> None:
    from model_export.export import ExportOptions, export

    started = time.perf_counter()
    options = ExportOptions(
        checkpoint=checkpoint,
        progress=lambda message: print(f"  [{time.perf_counter() - started:5.0f} s] {message}"),
    )
    export(variant, out, options)


def check_weights(bundle: Path, checkpoint: Path) -> None:
    """Refuse a bundle that was not exported from `checkpoint`: TorchServe would then
    serve other weights than ours and LitServe."""
    recorded = load_bundle(bundle).manifest.weights.checkpoint_sha256
    if recorded != sha256_of(checkpoint):
        raise SystemExit(
            f"{bundle} was not exported from {checkpoint}: its manifest records checkpoint "
            f"sha256 {recorded}, the file's is {sha256_of(checkpoint)}"
        )


def check_stock_transform(bundle: Path) -> None:
    """TorchServe's stock handler resizes to 256, crops 224 and normalises with ImageNet's
    statistics; a bundle evaluated otherwise would get other inputs there."""
    pre = load_bundle(bundle).manifest.preprocess
    resized = round(pre.input_size[0] / (pre.crop_pct or 1.0))
    if (
        tuple(pre.input_size) != STOCK_HANDLER_CROP
        or resized != STOCK_HANDLER_RESIZE
        or tuple(pre.mean) != IMAGENET_MEAN
        or tuple(pre.std) != IMAGENET_STD
    ):
        raise SystemExit(
            f"{bundle}: input {tuple(pre.input_size)} from {resized}, mean {pre.mean}, std "
            f"{pre.std}; TorchServe's stock image_classifier handler crops "
            f"{STOCK_HANDLER_CROP} from {STOCK_HANDLER_RESIZE} with ImageNet's mean and std"
        )


# ---------------------------------------------------------------- processes


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def end(pids: list[int], grace_s: float = 30.0) -> None:
    """SIGTERM the processes of `pids` still running, SIGKILL those left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        give_up_at = time.monotonic() + grace_s
        while any(alive(pid) for pid in pids) and time.monotonic() < give_up_at:
            time.sleep(0.2)


@contextlib.contextmanager
def paused(servers: list[Server]) -> Iterator[None]:
    """The servers' processes stopped (SIGSTOP) for the block, then continued: an idle
    server's background threads (LitServe's polling loops) take no CPU from the one
    being measured."""
    pids = [pid for server in servers for pid in process_tree(server.pid)]
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


# ---------------------------------------------------------------- the three servers


def ours_top_k(answer: dict) -> list[tuple[str, float]]:
    return [(s["label"], s["score"]) for s in answer["results"][0]["top_k"]]


def litserve_top_k(answer: dict) -> list[tuple[str, float]]:
    return [(s["label"], s["score"]) for s in answer["top_k"]]


def torchserve_top_k(answer: dict) -> list[tuple[str, float]]:
    return sorted(answer.items(), key=lambda item: -item[1])


@contextlib.contextmanager
def ours(
    args: argparse.Namespace, bundle: Path, threads: int, work: Path, name: str = "ours"
) -> Iterator[Server]:
    settings = argparse.Namespace(**{**vars(args), "model_dir": bundle, "engine_threads": threads})
    flags = server_flags(settings) + (shlex.split(args.alt_flags) if name == ALT else [])
    with serving(None, flags, log_path=work / f"{name}.log") as (url, process):
        yield Server(name, url, "/classify", {"top_k": TOP_K}, process.pid, ours_top_k)


def torchserve_archive(bundle: Path, checkpoint: Path, args: argparse.Namespace, folder: Path):
    """The model store: the traced torch model with the stock image_classifier handler."""
    import torch

    from model_export import create_model

    manifest = load_bundle(bundle).manifest
    size = manifest.preprocess.input_size
    model = create_model(
        manifest.variant, checkpoint, num_classes=len(manifest.labels), image_size=size[0]
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.x
        torch.jit.trace(model, torch.zeros(1, 3, *size)).save(folder / "model.pt")
    labels = {str(index): label for index, label in enumerate(manifest.labels)}
    (folder / "index_to_name.json").write_text(json.dumps(labels))
    (folder / "model-config.yaml").write_text(
        f"minWorkers: {args.torchserve_workers}\nmaxWorkers: {args.torchserve_workers}\n"
        f"batchSize: {args.max_batch_size}\n"
        f"maxBatchDelay: {args.torchserve_delay_ms}\nresponseTimeout: 120\n"
    )
    store = folder / "model_store"
    store.mkdir()
    subprocess.run(
        [
            str(args.peers_venv / "bin" / "torch-model-archiver"), "--model-name", TS_MODEL,
            "--version", "1.0", "--serialized-file", str(folder / "model.pt"),
            "--handler", "image_classifier", "--extra-files", str(folder / "index_to_name.json"),
            "--config-file", str(folder / "model-config.yaml"), "--export-path", str(store),
        ],
        check=True,
    )  # fmt: skip
    return store


def torchserve_config(folder: Path, workers: int) -> tuple[Path, int, int]:
    """config.properties: every listener on a free loopback port, no token (0.12 turns
    token authorization on by default), no system metrics (a collector process every
    minute); the inference and management ports."""
    ports = set()
    while len(ports) < 5:
        ports.add(free_port())
    inference, management, metrics, grpc_inference, grpc_management = sorted(ports)
    config = folder / "config.properties"
    config.write_text(
        f"inference_address=http://{LOOPBACK}:{inference}\n"
        f"management_address=http://{LOOPBACK}:{management}\n"
        f"metrics_address=http://{LOOPBACK}:{metrics}\n"
        f"grpc_inference_address={LOOPBACK}\ngrpc_inference_port={grpc_inference}\n"
        f"grpc_management_address={LOOPBACK}\ngrpc_management_port={grpc_management}\n"
        "disable_token_authorization=true\ndisable_system_metrics=true\n"
        f"default_workers_per_model={workers}\n"
    )
    return config, inference, management


def torchserve_model_ready(management_url: str, args: argparse.Namespace) -> bool:
    """Whether the model's --torchserve-workers workers are all READY; a running model
    with other batching settings than asked ends the run."""
    try:
        described = httpx.get(f"{management_url}/models/{TS_MODEL}", timeout=5).json()[0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return False
    asked = {"batchSize": args.max_batch_size, "maxBatchDelay": args.torchserve_delay_ms}
    got = {key: described.get(key) for key in asked}
    if got != asked:
        raise SystemExit(f"TorchServe runs {TS_MODEL} with {got}, not {asked}")
    workers = described.get("workers", [])
    ready = all(worker.get("status") == "READY" for worker in workers)
    return len(workers) == args.torchserve_workers and ready


@contextlib.contextmanager
def torchserve(
    args: argparse.Namespace, bundle: Path, checkpoint: Path, work: Path
) -> Iterator[Server]:
    """`torchserve --start` with the archive, stopped with `torchserve --stop`; its logs,
    its pid file and its temporary files stay in work/torchserve."""
    folder = work / "torchserve"
    (folder / "tmp").mkdir(parents=True)
    logs = folder / "logs"
    store = torchserve_archive(bundle, checkpoint, args, folder)
    config, inference, management = torchserve_config(folder, args.torchserve_workers)
    env = {
        **os.environ,
        "TMPDIR": str(folder / "tmp"),  # the pid file `torchserve --stop` reads
        "TEMP": str(folder / "tmp"),  # the JVM's java.io.tmpdir
        "LOG_LOCATION": str(logs),
        "METRICS_LOCATION": str(logs),
        "OMP_NUM_THREADS": str(args.torchserve_threads),
        "PATH": f"{args.peers_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [str(args.peers_venv / "bin" / "torchserve")]
    console = folder / "console.log"
    with console.open("w") as out:
        subprocess.run(
            [*command, "--start", "--ncs", "--disable-token-auth", "--model-store", str(store),
             "--models", f"{TS_MODEL}={TS_MODEL}.mar", "--ts-config", str(config)],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=120,
        )  # fmt: skip
    pid = int((folder / "tmp" / ".model_server.pid").read_text())
    tree = [pid]
    try:
        give_up_at = time.monotonic() + READY_TIMEOUT_S
        while not torchserve_model_ready(f"http://{LOOPBACK}:{management}", args):
            if not alive(pid) or time.monotonic() > give_up_at:
                why = "exited" if not alive(pid) else f"not ready in {READY_TIMEOUT_S} s"
                raise SystemExit(
                    f"TorchServe {why}; logs in {logs}; the end of ts_log.log and "
                    f"console.log:\n{tail(logs / 'ts_log.log')}\n{tail(console)}"
                )
            time.sleep(0.5)
        tree = process_tree(pid)
        url = f"http://{LOOPBACK}:{inference}"
        yield Server("torchserve", url, f"/predictions/{TS_MODEL}", {}, pid, torchserve_top_k)
    finally:
        with (folder / "stop.log").open("w") as out:
            subprocess.run(
                [*command, "--stop"], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        end(tree)


@contextlib.contextmanager
def litserve(args: argparse.Namespace, bundle: Path, threads: int, work: Path) -> Iterator[Server]:
    """bench/peer_litserve.py in the peers' virtualenv, in a process group of its own
    (LitServe starts an HTTP process and an inference worker), ended as a group."""
    port, log = free_port(), work / "litserve.log"
    command = [
        str(args.peers_venv / "bin" / "python"), str(REPO / "bench" / "peer_litserve.py"),
        "--model-dir", str(bundle), "--port", str(port), "--engine", args.engine,
        "--precision", args.precision, "--threads", str(threads),
        "--workers", str(args.instances), "--max-batch-size", str(args.max_batch_size),
        "--batch-timeout", str(args.litserve_timeout_ms / 1000.0),
        *(["--spinning"] if args.engine_spinning else []),
        *(["--static-shapes"] if args.openvino_static_shapes else []),
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_ready(url, process, timeout_s=READY_TIMEOUT_S, path="/health", log_path=log)
        yield Server("litserve", url, "/predict", {}, process.pid, litserve_top_k)
    except ServerNotReady as exc:
        raise SystemExit(f"LitServe: {exc}") from exc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ---------------------------------------------------------------- answers and load


def answer(server: Server, image: bytes) -> list[tuple[str, float]]:
    response = httpx.post(
        f"{server.url}{server.path}",
        params=server.params,
        content=image,
        headers={"content-type": "image/jpeg"},
        timeout=120,
    )
    if response.status_code != 200:
        raise SystemExit(f"{server.name} answered {response.status_code}: {response.text[:500]}")
    return server.top_k(response.json())[:TOP_K]


def check_answers(servers: list[Server], image: bytes) -> None:
    """The same top-1 label from every server; LitServe's top-5 labels (and scores within
    SCORE_TOLERANCE) ours: the same engine."""
    answers = {server.name: answer(server, image) for server in servers}
    for name, top in answers.items():
        print(f"  {name:<10} " + "  ".join(f"{label} {score:.4f}" for label, score in top))
    top1 = {name: top[0][0] for name, top in answers.items()}
    if len(set(top1.values())) != 1:
        raise SystemExit(f"the servers disagree on the top-1 label: {top1}")
    if not ("ours" in answers and "litserve" in answers):
        return
    ours_top, lit_top = answers["ours"], answers["litserve"]
    gap = max(abs(a[1] - b[1]) for a, b in zip(ours_top, lit_top, strict=True))
    if [a[0] for a in ours_top] != [b[0] for b in lit_top] or gap > SCORE_TOLERANCE:
        raise SystemExit(
            f"LitServe's top-5 is not ours (largest score difference {gap:.2e}, tolerance "
            f"{SCORE_TOLERANCE:g}): {lit_top} vs {ours_top}"
        )
    print(f"  ours and LitServe: the same top-5 labels, scores within {gap:.1e}")


@dataclass
class Run:
    round_index: int
    server: str
    result: LoadResult
    cpu_per_image: float
    memory_mib: float  # the server's process tree's PSS at the run's end


def load(
    server: Server, image: bytes, level: int, seconds: float, requests: int
) -> tuple[LoadResult, float]:
    """`level` closed-loop clients for `seconds` (or `requests`): the result and the
    server's CPU seconds per image answered."""
    tree = process_tree(server.pid)
    before = cpu_seconds(tree)
    result = asyncio.run(
        closed_loop(server.url, server.path, image, server.params, level, seconds, requests)
    )
    spent = cpu_seconds(tree) - before
    return result, spent / result.ok if result.ok else float("nan")


def measure(
    server: Server, image: bytes, args: argparse.Namespace, level: int, round_index: int
) -> Run:
    result, cpu_per_image = load(server, image, level, args.duration, args.requests)
    return Run(
        round_index, server.name, result, cpu_per_image, memory_mib(process_tree(server.pid))
    )


def warm(server: Server, image: bytes, level: int, args: argparse.Namespace) -> str:
    """`--warmup` requests, then windows of load until the server's CPU per image stops
    falling (two windows in a row none 3% under the lowest before them) or
    `--warmup-max-s` has passed; what each window cost, for the log. A server still
    speeding up (a JIT compiling, pools filling) would otherwise lose the first rounds to
    its warm-up."""
    result = asyncio.run(
        closed_loop(server.url, server.path, image, server.params, level, 300.0, args.warmup)
    )
    if result.errors:
        raise SystemExit(f"{server.name} failed warm-up requests: {result.errors}")
    costs: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < args.warmup_max_s:
        window, cost = load(server, image, level, WARM_WINDOW_S, 10**6)
        if window.errors or not window.ok:
            raise SystemExit(f"{server.name} failed warm-up requests: {window.errors}")
        costs.append(cost)
        if len(costs) >= 3 and min(costs[-2:]) > 0.97 * min(costs[:-2]):
            break  # two windows without a new low
    return " ".join(f"{cost:.3f}" for cost in costs)


def idle_cpu(servers: list[Server], seconds: float = 3.0) -> dict[str, float]:
    """CPU seconds per second each server spends with no request (background threads)."""
    trees = {server.name: process_tree(server.pid) for server in servers}
    before = {name: cpu_seconds(tree) for name, tree in trees.items()}
    time.sleep(seconds)
    return {name: (cpu_seconds(tree) - before[name]) / seconds for name, tree in trees.items()}


# ---------------------------------------------------------------- report


def print_run(run: Run, level: int) -> None:
    r = run.result
    errors = ",".join(f"{k}:{v}" for k, v in sorted(r.errors.items())) or "-"
    print(
        f"{run.round_index:>5} {level:>5} {run.server:<10} {r.ok:>6} {errors:>10} "
        f"{r.throughput:>7.1f} {r.percentile(50):>8.1f} {r.percentile(95):>8.1f} "
        f"{r.percentile(99):>8.1f} {run.cpu_per_image:>9.3f} {run.memory_mib:>8.0f}",
        flush=True,
    )


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def summarize(runs: list[Run], level: int, names: list[str]) -> None:
    by_server = {name: [run for run in runs if run.server == name] for name in names}
    print(f"\nconcurrency {level}, medians over {len(by_server[names[0]])} rounds:")
    print(
        f"  {'server':<10} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'cpu s/img':>9} {'PSS MiB':>8}"
    )
    for name, mine in by_server.items():
        print(
            f"  {name:<10} {statistics.median(r.result.throughput for r in mine):>7.1f} "
            f"{statistics.median(r.result.percentile(50) for r in mine):>8.1f} "
            f"{statistics.median(r.result.percentile(99) for r in mine):>8.1f} "
            f"{statistics.median(r.cpu_per_image for r in mine):>9.3f} "
            f"{statistics.median(r.memory_mib for r in mine):>8.0f}"
        )
    if "ours" not in by_server:
        return
    for peer in (name for name in names if name != "ours"):
        pairs = list(zip(by_server["ours"], by_server[peer], strict=True))
        speed = [a.result.throughput / b.result.throughput for a, b in pairs if b.result.ok]
        p99 = [a.result.percentile(99) / b.result.percentile(99) for a, b in pairs if b.result.ok]
        memory = [a.memory_mib / b.memory_mib for a, b in pairs if b.memory_mib]
        if speed:
            print(
                f"  ours / {peer}: img/s {spread(speed)}, p99 {spread(p99)}, memory "
                f"{spread(memory)} (per-round ratios: median (range); p99 and memory below "
                "1 = ours lower)"
            )


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def peer_versions(venv: Path) -> str:
    packages = ("torch", "torchserve", "litserve", "onnxruntime", "openvino")
    code = (
        "import importlib.metadata as m\n"
        "def version(p):\n"
        "    try:\n        return m.version(p)\n"
        "    except m.PackageNotFoundError:\n        return 'absent'\n"
        "print(*(f'{p} {version(p)}' for p in %r))"
    )
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code % (packages,)],
        capture_output=True,
        text=True,
        check=True,
    )
    return found.stdout.strip()


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a bundle exported from --checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="weights (default: seeded random)")
    parser.add_argument("--variant", default="hornet_tiny_7x7", help="without --model-dir")
    parser.add_argument("--seed", type=int, default=0, help="of the seeded weights")
    parser.add_argument(
        "--work", type=Path, help="files and logs, a new or empty folder (default: a new temp one)"
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="a subset, in this order")
    parser.add_argument("--peers-venv", type=Path, default=REPO / ".venv-peers")
    parser.add_argument("--image", type=Path, help="JPEG to POST (default: loadgen's photo)")
    parser.add_argument("--image-size", default="384x256", help="WxH of loadgen's photo")
    parser.add_argument("--concurrency", default="8", help="comma-separated levels")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all the servers")
    parser.add_argument("--requests", type=int, default=100_000, help="request cap per run")
    parser.add_argument("--warmup", type=int, default=32, help="requests per server first")
    parser.add_argument(
        "--warmup-max-s",
        type=float,
        default=240.0,
        help="then load until its CPU per image stops falling, at most this long",
    )
    parser.add_argument("--torchserve-delay-ms", type=int, default=20, help="max_batch_delay")
    parser.add_argument("--torchserve-workers", type=int, help="default: --instances")
    parser.add_argument("--torchserve-threads", type=int, help="default: the engine threads")
    parser.add_argument("--litserve-timeout-ms", type=float, default=5.0, help="batch_timeout")
    parser.add_argument(
        "--alt-flags",
        default="",
        help=f"server flags added for {ALT!r} in --servers: ours against ours with them",
    )
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    args.servers = [name.strip() for name in args.servers.split(",")]
    args.torchserve_workers = args.torchserve_workers or args.instances
    if unknown := set(args.servers) - {*SERVERS, ALT}:
        parser.error(f"--servers: unknown {sorted(unknown)}; choose from {(*SERVERS, ALT)}")
    if ALT in args.servers and not args.alt_flags:
        parser.error(f"--servers {ALT} needs --alt-flags")
    if args.model_dir is not None and args.checkpoint is None:
        parser.error("--model-dir needs --checkpoint, the file it was exported from")
    if args.device != "cpu":
        parser.error("the peers here run on the CPU: --device cpu")
    if {"torchserve", "litserve"} & set(args.servers) and not args.peers_venv.is_dir():
        parser.error(f"{args.peers_venv} does not exist: run tools/make_peers_env.sh first")
    if args.work is not None and args.work.exists():
        if not args.work.is_dir():
            parser.error(f"--work {args.work} is a file: give a new or empty folder")
        if any(args.work.iterdir()):
            # A previous run's TorchServe store and pid file would be taken for this run's.
            parser.error(f"--work {args.work} is not empty: give a new or empty folder")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="hornet-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = args.engine_threads or os.cpu_count() or 1
    args.torchserve_threads = args.torchserve_threads or threads
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    image = args.image.read_bytes() if args.image else test_image((width, height))
    print(f"{machine()}; files and logs in {work}", flush=True)
    if {"torchserve", "litserve"} & set(args.servers):
        print(f"peers ({args.peers_venv}): {peer_versions(args.peers_venv)}")

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / f"{args.variant}_seed{args.seed}.pth"
        print(f"{args.variant}: seeded random weights (seed {args.seed}) -> {checkpoint}")
        seeded_checkpoint(args.variant, args.seed, checkpoint)
    bundle = args.model_dir
    if bundle is None:
        bundle = work / "bundle"
        print(f"exporting {checkpoint.name} to {bundle} ...", flush=True)
        export_bundle(args.variant, checkpoint, bundle)
    check_weights(bundle, checkpoint)
    if "torchserve" in args.servers:
        check_stock_transform(bundle)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(
        f"bundle {bundle}; image {len(image)} bytes; concurrency {levels}; {args.rounds} rounds "
        f"of {args.duration:g} s; batch {args.max_batch_size}; delay: ours "
        f"{args.max_delay_ms:g} ms, TorchServe {args.torchserve_delay_ms} ms, LitServe "
        f"{args.litserve_timeout_ms:g} ms; {args.instances} workers of {threads} engine "
        f"threads each (TorchServe {args.torchserve_workers} of "
        f"{args.torchserve_threads}); ours and LitServe {args.engine} "
        f"{args.precision}",
        flush=True,
    )

    starters = {
        "ours": lambda: ours(args, bundle, threads, work),
        "torchserve": lambda: torchserve(args, bundle, checkpoint, work),
        "litserve": lambda: litserve(args, bundle, threads, work),
        ALT: lambda: ours(args, bundle, threads, work, ALT),
    }
    with contextlib.ExitStack() as stack:
        servers = []
        for name in args.servers:
            started = time.perf_counter()
            servers.append(stack.enter_context(starters[name]()))
            print(f"{name} ready at {servers[-1].url} in {time.perf_counter() - started:.0f} s")
        print("answers to the image (top-5):")
        check_answers(servers, image)
        for server in servers:
            costs = warm(server, image, max(levels), args)
            print(f"{server.name} warmed up: CPU s/img in {WARM_WINDOW_S:g} s windows {costs}")
        idle = idle_cpu(servers)
        print(
            "CPU seconds per second with no requests: "
            + ", ".join(f"{name} {value:.3f}" for name, value in idle.items())
            + " (during each run the other servers are paused)"
        )
        print(
            f"\n{'round':>5} {'conc':>5} {'server':<10} {'ok':>6} {'errors':>10} {'img/s':>7} "
            f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'cpu s/img':>9} {'PSS MiB':>8}"
        )
        runs: dict[int, list[Run]] = {level: [] for level in levels}
        for level in levels:
            for round_ in range(1, args.rounds + 1):
                for server in round_order(servers, round_):
                    with paused([other for other in servers if other is not server]):
                        run = measure(server, image, args, level, round_)
                    runs[level].append(run)
                    print_run(run, level)
    for level in levels:
        summarize(runs[level], level, args.servers)
    print(f"\nafter the rounds: {machine()}")
    return 0


if __name__ == "__main__":
    # `kill` or a timeout unwinds as Ctrl-C does, so the servers started here stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
