"""The server of this working tree against the server of another git revision, side by
side on the same load: did a change make serving faster or slower?

    python bench/revisions.py --base HEAD~1 --model-dir BUNDLE --concurrency 8 --rounds 4

The base revision is checked out in a temporary git worktree (removed at the end); both
servers run `python -m service` with loadgen's server flags, each from its own tree, on
the same bundle (by default the packaged demo classifier, whose engine takes about a
millisecond, so that HTTP, decoding and the event loop show). In each round, in
alternating order, each server takes --concurrency closed-loop clients for --duration
seconds (after a second of warm-up) while the other is paused (SIGSTOP). Printed per run:
requests/s, p50, p99 and the server's CPU per request (its processes' user + system
time); then the medians, and this tree over the base round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
)

DEMO = REPO / "service" / "demo_bundles" / "shapes_classify"
NAMES = ("this", "base")


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """`revision` checked out (detached) in a temporary directory for the block; checked
    to be the `service` package a server started there imports."""
    with tempfile.TemporaryDirectory(prefix="hornet-base-") as parent:
        tree = Path(parent) / "tree"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", "-q", str(tree), revision], check=True)
        try:
            where = subprocess.run(
                [sys.executable, "-c", "import service; print(service.__file__)"],
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if not Path(where).is_relative_to(tree):
                raise SystemExit(f"a server started in {tree} would import {where}")
            yield tree
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--model-dir", type=Path, default=DEMO, help="a classifier bundle")
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
        f"this tree against {args.base}; {args.concurrency} clients, {args.rounds} rounds of "
        f"{args.duration:g} s per server"
    )
    results: dict[str, list[tuple[LoadResult, float]]] = {name: [] for name in NAMES}
    with (
        worktree(args.base) as base_tree,
        serving(None, flags) as (this_url, this_process),
        serving(None, flags, env={"PYTHONPATH": str(base_tree)}, cwd=base_tree) as (
            base_url,
            base_process,
        ),
    ):
        servers = {"this": (this_url, this_process), "base": (base_url, base_process)}
        header = f"{'round':>5} {'server':<6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        print(f"{header} {'CPU ms/req':>10}")
        for round_ in range(1, args.rounds + 1):
            order = NAMES if round_ % 2 else NAMES[::-1]
            for name in order:
                url, process = servers[name]
                other = servers[NAMES[1 - NAMES.index(name)]][1]
                with paused(other):
                    warm = closed_loop(url, path, image, dict(query), args.concurrency, 1, 10**9)
                    asyncio.run(warm)
                    pids = process_tree(process.pid)
                    cpu_before = cpu_seconds(pids)
                    load = asyncio.run(
                        closed_loop(
                            url, path, image, dict(query), args.concurrency, args.duration, 10**9
                        )
                    )
                    cpu_ms = (cpu_seconds(pids) - cpu_before) * 1000 / max(load.ok, 1)
                results[name].append((load, cpu_ms))
                print(
                    f"{round_:>5} {name:<6} {load.throughput:>8.1f} {load.percentile(50):>8.1f}"
                    f" {load.percentile(99):>8.1f} {cpu_ms:>10.2f}"
                    + (f"  errors {load.errors}" if load.errors else "")
                )
    print("\nmedians over the rounds:")
    for name in NAMES:
        runs = results[name]
        print(
            f"  {name:<6} {statistics.median(load.throughput for load, _ in runs):.1f} req/s, "
            f"p50 {statistics.median(load.percentile(50) for load, _ in runs):.1f} ms, "
            f"p99 {statistics.median(load.percentile(99) for load, _ in runs):.1f} ms, "
            f"{statistics.median(cpu for _, cpu in runs):.2f} ms of server CPU per request"
        )
    ratios = [
        this.throughput / base.throughput
        for (this, _), (base, _) in zip(results["this"], results["base"], strict=True)
    ]
    print(
        f"this / base req/s: {statistics.median(ratios):.3f} (rounds: "
        + " ".join(f"{ratio:.3f}" for ratio in ratios)
        + ")"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
