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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.alternating import (  # noqa: E402 - after the path insert
    add_arguments,
    alternate,
    image_of,
    medians,
)
from bench.loadgen import (  # noqa: E402
    server_flags,
    serving,
    warm,
)
from tests.helpers.otlp import running_collector  # noqa: E402

SPANS_PER_REQUEST = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a classifier bundle")
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    image = image_of(args)
    flags = server_flags(args)
    print(f"server: python -m service {' '.join(flags)}")
    print(
        f"{args.concurrency} clients, {args.rounds} rounds of {args.duration:g} s per server; "
        "traced: --trace-rate 1 to an OTLP receiver in this process"
    )
    with (
        running_collector() as collector,
        serving(None, flags) as plain,
        serving(None, [*flags, "--trace-endpoint", collector.url, "--trace-rate", "1"]) as traced,
    ):
        for url, _ in (plain, traced):
            asyncio.run(warm(url, image, None, "classify"))
        time.sleep(6.0)  # OpenTelemetry's batch delay (5 s): the warm-up's spans exported
        spans_before = len(collector.spans())
        runs = alternate(
            {"plain": plain, "traced": traced}, image, args.concurrency, args.rounds, args.duration
        )
        time.sleep(6.0)  # the last spans exported
        traced_requests = sum(run.load.ok + sum(run.load.errors.values()) for run in runs["traced"])
        spans = len(collector.spans()) - spans_before
    found = medians(runs)
    t, p = found["traced"], found["plain"]
    print(
        f"traced / plain: req/s {t.throughput / p.throughput:.3f}x, p50 {t.p50 / p.p50:.2f}x, "
        f"p99 {t.p99 / p.p99:.2f}x, CPU per request +{t.cpu_ms - p.cpu_ms:.2f} ms"
    )
    print(
        f"spans received: {spans} for {traced_requests} traced requests "
        f"({spans / max(traced_requests, 1):.2f} a request, {SPANS_PER_REQUEST} expected)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
