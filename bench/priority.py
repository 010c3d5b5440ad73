"""Interactive requests beside a bulk job on one model, with and without asking for a
higher priority level (`--priority-levels 2`, docs/configuration.md "Priority levels").

    python bench/priority.py --model-dir BUNDLE --bulk 8 --interactive 1 --rounds 3 --duration 15

One server (`python -m service` with loadgen's server flags and `--priority-levels 2`)
serves both. In each round, in alternating order, the same load runs twice for --duration
seconds: --bulk closed-loop clients at the default (lowest) level, and beside them
--interactive closed-loop clients that ask for level 1 (`?priority=1`) in one run and
leave the default in the other, so that both runs queue alike and only the order the
server takes them in differs. Printed per run: the interactive clients' img/s, p50 and
p99, and the bulk clients' img/s; then the medians over the rounds and the ratios with
priority / without (p99 below 1: the interactive answers come sooner).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (  # noqa: E402 - after the path insert
    ROUTES,
    LoadResult,
    add_server_arguments,
    closed_loop,
    server_flags,
    serving,
    test_image,
    warm,
)

MODES = ("priority", "fifo")  # interactive at level 1, or at the default like the bulk


async def run(
    url: str, image: bytes, bulk: int, interactive: int, seconds: float, ask: bool
) -> tuple[LoadResult, LoadResult]:
    """The bulk and interactive clients side by side; their results."""
    path, query = ROUTES["classify"]
    asking = {**query, "priority": 1} if ask else dict(query)
    limit = 10**9
    bulk_load, interactive_load = await asyncio.gather(
        closed_loop(url, path, image, dict(query), bulk, seconds, limit),
        closed_loop(url, path, image, asking, interactive, seconds, limit),
    )
    return bulk_load, interactive_load


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a classifier bundle")
    parser.add_argument("--bulk", type=int, default=8, help="bulk clients (default level)")
    parser.add_argument("--interactive", type=int, default=1, help="interactive clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--image-size", default="640x480", help="the JPEG's WxH")
    add_server_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = map(int, args.image_size.split("x"))
    image = test_image((width, height))
    flags = [*server_flags(args), "--priority-levels", "2"]
    print(f"server: python -m service {' '.join(flags)}")
    print(
        f"{args.bulk} bulk clients at the default level beside {args.interactive} "
        f"interactive ones; {args.rounds} rounds of {args.duration:g} s per mode"
    )
    results: dict[str, list[tuple[LoadResult, LoadResult]]] = {mode: [] for mode in MODES}
    with serving(None, flags) as (url, _):
        asyncio.run(warm(url, image, None, "classify"))
        header = f"{'round':>5} {'mode':<9} {'inter img/s':>11} {'p50 ms':>8} {'p99 ms':>8}"
        print(f"{header} {'bulk img/s':>10} {'errors':>7}")
        for round_ in range(1, args.rounds + 1):
            order = MODES if round_ % 2 else MODES[::-1]
            for mode in order:
                bulk, inter = asyncio.run(
                    run(url, image, args.bulk, args.interactive, args.duration, mode == MODES[0])
                )
                results[mode].append((bulk, inter))
                errors = sum(bulk.errors.values()) + sum(inter.errors.values())
                print(
                    f"{round_:>5} {mode:<9} {inter.throughput:>11.1f} {inter.percentile(50):>8.1f}"
                    f" {inter.percentile(99):>8.1f} {bulk.throughput:>10.1f} {errors:>7}"
                )
    print("\nmedians over the rounds:")
    medians = {}
    for mode in MODES:
        runs = results[mode]
        medians[mode] = {
            "p50": statistics.median(inter.percentile(50) for _, inter in runs),
            "p99": statistics.median(inter.percentile(99) for _, inter in runs),
            "inter": statistics.median(inter.throughput for _, inter in runs),
            "bulk": statistics.median(bulk.throughput for bulk, _ in runs),
        }
        m = medians[mode]
        print(
            f"  {mode:<9} interactive {m['inter']:.1f} img/s, p50 {m['p50']:.1f} ms, "
            f"p99 {m['p99']:.1f} ms; bulk {m['bulk']:.1f} img/s"
        )
    with_, without = medians["priority"], medians["fifo"]
    print(
        f"priority / fifo: interactive p50 {with_['p50'] / without['p50']:.2f}x, "
        f"p99 {with_['p99'] / without['p99']:.2f}x, "
        f"img/s {with_['inter'] / without['inter']:.2f}x; "
        f"bulk img/s {with_['bulk'] / without['bulk']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
