"""The batcher's hand-off between batches, side by side: the engine handed its next batch
before the last batch's answers are delivered (`dispatch_first`, the service's way since
2026-12-04) or after them (before).

    python bench/handoff.py [--rounds 3] [--seconds 4]

No model and no HTTP: `service.batching.BatchQueue` with one engine that sleeps for its
run (no GIL held, as ONNX Runtime's CUDA and CPU runs), fed by closed-loop clients that
are checked for a departed client as the service does (one suspension each) and spend a
fixed CPU time on the event loop for each answer (what building and sending an HTTP
response costs). Cases: a GPU-like engine (22 ms per batch of up to 32, 64 clients, 0.4 ms
per answer: the H200's tiny classifier in docs/gpu.md) and a CPU-like one (200 ms per
batch of up to 8, 8 clients, 0.5 ms per answer). Prints per case the items/s and the
share of the time the engine ran for each way (medians over alternating rounds) and the
ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from service.batching import BatchQueue

CASES = {
    "GPU-like: 22 ms per batch of 32, 64 clients, 0.4 ms per answer": (0.022, 32, 64, 0.0004),
    "CPU-like: 200 ms per batch of 8, 8 clients, 0.5 ms per answer": (0.200, 8, 8, 0.0005),
}


async def one_run(
    engine_s: float, batch: int, clients: int, answer_s: float, seconds: float, first: bool
) -> tuple[float, float]:
    """items/s and the engine's busy share over `seconds` of closed-loop load."""
    busy = [0.0]

    def engine(items: list[int]) -> list[int]:
        busy[0] += engine_s
        time.sleep(engine_s)
        return items

    async def is_gone() -> bool:
        await asyncio.sleep(0)
        return False

    queue = BatchQueue(
        [engine], max_batch_size=batch, max_delay_s=0.005, max_queue_size=1024,
        close_early=True, dispatch_first=first,
    )  # fmt: skip
    queue.start()
    answered = [0]
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop_at:
            await queue.submit(1, is_gone=is_gone)
            spin_until = time.perf_counter() + answer_s
            while time.perf_counter() < spin_until:
                pass
            answered[0] += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.monotonic() - started
    await queue.close(1.0)
    return answered[0] / wall, busy[0] / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    print(f"{'case':66s} {'way':15s} {'items/s':>8s} {'engine busy':>12s}")
    for name, case in CASES.items():
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for first in (False, True):
                runs[first].append(asyncio.run(one_run(*case, args.seconds, first)))
        rates = {}
        for first in (False, True):
            rates[first] = statistics.median(rate for rate, _ in runs[first])
            busy = statistics.median(share for _, share in runs[first])
            way = "dispatch first" if first else "answers first"
            print(f"{name:66s} {way:15s} {rates[first]:>8.1f} {busy:>12.0%}")
        print(f"{name:66s} {'ratio':15s} {rates[True] / rates[False]:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
