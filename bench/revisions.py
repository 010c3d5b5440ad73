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

from bench.alternating import (  # noqa: E402 - after the path insert
    add_arguments,
    alternate,
    image_of,
    medians,
)
from bench.loadgen import server_flags, serving  # noqa: E402

DEMO = REPO / "service" / "demo_bundles" / "shapes_classify"


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
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    image = image_of(args)
    flags = server_flags(args)
    print(f"server: python -m service {' '.join(flags)}")
    print(
        f"this tree against {args.base}; {args.concurrency} clients, {args.rounds} rounds of "
        f"{args.duration:g} s per server"
    )
    with (
        worktree(args.base) as base_tree,
        serving(None, flags) as this,
        serving(None, flags, env={"PYTHONPATH": str(base_tree)}, cwd=base_tree) as base,
    ):
        runs = alternate(
            {"this": this, "base": base},
            image,
            args.concurrency,
            args.rounds,
            args.duration,
            warm_s=1.0,
        )
    medians(runs)
    ratios = [
        this.load.throughput / base.load.throughput
        for this, base in zip(runs["this"], runs["base"], strict=True)
    ]
    print(
        f"this / base req/s: {statistics.median(ratios):.3f} (rounds: "
        + " ".join(f"{ratio:.3f}" for ratio in ratios)
        + ")"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
