"""What tracing every request costs (`--trace-endpoint`, docs/kserve-v2.md "Traces"):
the same server with and without OpenTelemetry traces, side by side.

    python bench/tracing_cost.py --model-dir BUNDLE --concurrency 8 --rounds 4 --duration 10

Two servers (`python -m service` with loadgen's server flags) on the bundle: one plain,
one with `--trace-endpoint` at an OTLP/HTTP receiver in this process
(tests/helpers/otlp.py, decoding the spans) and `--trace-rate 1` (every request traced:
the most tracing can cost; the default, 1 in 1000, costs a thousandth of that). In each
round, in alternating order, each server takes --concurrency closed-loop clients for
--duration seconds while the other is paused (SIGSTOP). Printed per run: img/s, p50, p99
and the server's CPU per request (its processes' user + system time over the run);
then the medians over the rounds, the ratios traced / plain, and the spans the receiver
got against the traced server's requests (five a request: the server span and its four
stages).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (  # noqa: E402 - after the path insert
    ROUTES,
    LoadResult,
    add_server_arguments,
    closed_loop,
    cpu_seconds,
    paused,
    process_tree,
    server_flags,
    serving,
    test_image,
    warm,
)
from tests.helpers.otlp import running_collector  # noqa: E402

MODES = ("plain", "traced")
SPANS_PER_REQUEST = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a classifier bundle")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--image-size", default="384x256", help="the JPEG's WxH")
    add_server_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = map(int, args.image_size.split("x"))
    image = test_image((width, height))
    path, query = ROUTES["classify"]
    flags = server_flags(args)
    print(f"server: python -m service {' '.join(flags)}")
    print(
        f"{args.concurrency} clients, {args.rounds} rounds of {args.duration:g} s per server; "
        "traced: --trace-rate 1 to an OTLP receiver in this process"
    )
    results: dict[str, list[tuple[LoadResult, float]]] = {mode: [] for mode in MODES}
    with (
        running_collector() as collector,
        serving(None, flags) as (plain_url, plain),
        serving(None, [*flags, "--trace-endpoint", collector.url, "--trace-rate", "1"]) as (
            traced_url,
            traced,
        ),
    ):
        servers = {"plain": (plain_url, plain), "traced": (traced_url, traced)}
        for url, _ in servers.values():
            asyncio.run(warm(url, image, None, "classify"))
        time.sleep(6.0)  # OpenTelemetry's batch delay (5 s): the warm-up's spans exported
        spans_before = len(collector.spans())
        header = f"{'round':>5} {'server':<7} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        print(f"{header} {'CPU ms/req':>10}")
        for round_ in range(1, args.rounds + 1):
            order = MODES if round_ % 2 else MODES[::-1]
            for mode in order:
                url, process = servers[mode]
                other = servers[MODES[1 - MODES.index(mode)]][1]
                with paused(other):
                    pids = process_tree(process.pid)
                    cpu_before = cpu_seconds(pids)
                    load = asyncio.run(
                        closed_loop(
                            url, path, image, dict(query), args.concurrency, args.duration, 10**9
                        )
                    )
                    cpu_ms = (cpu_seconds(pids) - cpu_before) * 1000 / max(load.ok, 1)
                results[mode].append((load, cpu_ms))
                print(
                    f"{round_:>5} {mode:<7} {load.throughput:>8.1f} {load.percentile(50):>8.1f}"
                    f" {load.percentile(99):>8.1f} {cpu_ms:>10.2f}"
                    + (f"  errors {load.errors}" if load.errors else "")
                )
        time.sleep(6.0)  # OpenTelemetry's batch delay: the last spans exported
        traced_requests = sum(load.ok + sum(load.errors.values()) for load, _ in results["traced"])
        spans = len(collector.spans()) - spans_before
    print("\nmedians over the rounds:")
    medians = {}
    for mode in MODES:
        runs = results[mode]
        medians[mode] = {
            "img/s": statistics.median(load.throughput for load, _ in runs),
            "p50": statistics.median(load.percentile(50) for load, _ in runs),
            "p99": statistics.median(load.percentile(99) for load, _ in runs),
            "cpu": statistics.median(cpu for _, cpu in runs),
        }
        m = medians[mode]
        print(
            f"  {mode:<7} {m['img/s']:.1f} img/s, p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms, "
            f"{m['cpu']:.2f} ms of server CPU per request"
        )
    t, p = medians["traced"], medians["plain"]
    print(
        f"traced / plain: img/s {t['img/s'] / p['img/s']:.3f}x, p50 {t['p50'] / p['p50']:.2f}x, "
        f"p99 {t['p99'] / p['p99']:.2f}x, CPU per request +{t['cpu'] - p['cpu']:.2f} ms"
    )
    print(
        f"spans received: {spans} for {traced_requests} traced requests "
        f"({spans / max(traced_requests, 1):.2f} a request, {SPANS_PER_REQUEST} expected)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
