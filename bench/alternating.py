"""Two servers on the same closed-loop load, round by round in alternating order, the idle
one paused (SIGSTOP) so that its timers take nothing from the other: what
bench/revisions.py and bench/tracing_cost.py compare with."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
from dataclasses import dataclass

from bench.loadgen import (
    ROUTES,
    LoadResult,
    add_server_arguments,
    closed_loop,
    cpu_seconds,
    paused,
    process_tree,
    test_image,
)


@dataclass
class Run:
    load: LoadResult
    cpu_ms: float  # the server's processes' user + system CPU per answered request


@dataclass
class Medians:
    throughput: float
    p50: float
    p99: float
    cpu_ms: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The load's arguments (clients, rounds, seconds, the JPEG's size) and the server's
    (loadgen's server flags)."""
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--image-size", default="384x256", help="the JPEG's WxH")
    add_server_arguments(parser)


def image_of(args: argparse.Namespace) -> bytes:
    """The JPEG --image-size asks for (loadgen's test image)."""
    width, height = map(int, args.image_size.lower().split("x"))
    return test_image((width, height))


def measure(
    url: str,
    process: subprocess.Popen,
    image: bytes,
    concurrency: int,
    seconds: float,
    warm_s: float = 0.0,
) -> Run:
    """`concurrency` closed-loop clients on `/classify` for `seconds` (after `warm_s` of
    the same, not counted), and the server's CPU per request over them."""
    path, query = ROUTES["classify"]
    if warm_s:
        asyncio.run(closed_loop(url, path, image, dict(query), concurrency, warm_s, 10**9))
    pids = process_tree(process.pid)
    before = cpu_seconds(pids)
    load = asyncio.run(closed_loop(url, path, image, dict(query), concurrency, seconds, 10**9))
    return Run(load, (cpu_seconds(pids) - before) * 1000 / max(load.ok, 1))


def alternate(
    servers: dict[str, tuple[str, subprocess.Popen]],
    image: bytes,
    concurrency: int,
    rounds: int,
    seconds: float,
    warm_s: float = 0.0,
) -> dict[str, list[Run]]:
    """Each of the two `servers` (name: URL and process) measured once a round, the first
    first in odd rounds and last in even ones, the other paused meanwhile; a line printed
    per run."""
    names = list(servers)
    assert len(names) == 2, names
    width = max(map(len, names))
    header = f"{'round':>5} {'server':<{width}} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
    print(f"{header} {'CPU ms/req':>10}")
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for round_ in range(1, rounds + 1):
        for name in names if round_ % 2 else names[::-1]:
            url, process = servers[name]
            other = servers[names[1 - names.index(name)]][1]
            with paused(other):
                run = measure(url, process, image, concurrency, seconds, warm_s)
            runs[name].append(run)
            load = run.load
            print(
                f"{round_:>5} {name:<{width}} {load.throughput:>8.1f} {load.percentile(50):>8.1f}"
                f" {load.percentile(99):>8.1f} {run.cpu_ms:>10.2f}"
                + (f"  errors {load.errors}" if load.errors else "")
            )
    return runs


def medians(runs: dict[str, list[Run]]) -> dict[str, Medians]:
    """Each server's medians over its runs, printed."""
    print("\nmedians over the rounds:")
    found = {}
    for name, measured in runs.items():
        found[name] = m = Medians(
            statistics.median(run.load.throughput for run in measured),
            statistics.median(run.load.percentile(50) for run in measured),
            statistics.median(run.load.percentile(99) for run in measured),
            statistics.median(run.cpu_ms for run in measured),
        )
        print(
            f"  {name}: {m.throughput:.1f} req/s, p50 {m.p50:.1f} ms, p99 {m.p99:.1f} ms, "
            f"{m.cpu_ms:.2f} ms of server CPU per request"
        )
    return found
