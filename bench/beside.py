"""The bare engine alone, and beside the work a server does around it on the same CPUs.

    python bench/beside.py --model-dir B --engine openvino --precision bf16 \\
        --openvino-static-shapes --instances 2 --engine-threads 1 --batch 2 --rate 36

In a server under load the engines share the CPUs with everything else a request costs:
decoding and resizing the upload, the event loop (HTTP parsing, routing, the answer), the
log line, and, in `bench/loadgen.py`, the clients. loadgen counts those (the CPU-bound
ceiling) and finds the engine itself also taking more CPU per image in the server than
bare. This measures whether such work beside an engine is enough to make it so, with no
server around the engine under test:

  - the engine: the bundle's engines as the service builds them (`--instances` of
    `--engine-threads`, each in a thread of its own, as `loadgen.py`'s raw engine), run on
    the image as the service prepares it at `--batch`, for `--seconds`;
  - beside it, the neighbour: a real `python -m service` serving a bundle whose engine
    costs little (by default the demo classifier, about 1 ms an image), and a client
    process sending it the same JPEG at `--rate` requests per second, open loop (each on
    time, whatever the answers do): the decoding, event loop, logging and client work of
    a server at that rate, at about the engine's cost of one demo image more.

Each round runs the engines alone (the neighbour stopped with SIGSTOP) and beside the
neighbour, in turn (even rounds beside first). Printed per round and as medians: the
engines' images/s and CPU ms per image (this process's CPU: the engine threads), the
neighbour's CPU (server and client) per request and in cores; then the ratios beside /
alone, and the images/s the engines would keep if the neighbour only took its own CPU
time from them (each CPU the neighbour uses is one the engines do not), against which a
lower figure is the engine running slower per image beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.alternating import image_of  # noqa: E402
from bench.loadgen import (  # noqa: E402
    READY_TIMEOUT_S,
    add_server_arguments,
    cpu_seconds,
    paused,
    process_tree,
    round_order,
    server_values,
)
from hornet_bundle import load_bundle  # noqa: E402
from service.engines import instances_of  # noqa: E402
from service.imaging import decode_image  # noqa: E402
from service.pipelines import pipeline_for  # noqa: E402
from service.settings import DEMO_BUNDLES_DIR, Settings  # noqa: E402
from service.testing import running_server  # noqa: E402
from service.tuning import run_side_by_side  # noqa: E402

# The neighbour's client starts this long before the engines, so that they run beside a
# neighbour already at its rate, and stops as long after them.
LEAD_S = 1.0
# A neighbour whose last request went out later than this did not keep its rate.
LATE_S = 0.25


@dataclass
class Sent:
    answered: int
    failed: int
    late_s: float
    cpu_s: float


def open_loop(url: str, image: bytes, rate: float, seconds: float) -> Sent:
    """POST `image` to `url`/classify every 1/`rate` s for `seconds`, each request on
    time whatever the earlier ones are doing (open loop); what was answered 200, what
    was not, how late the last request went out, and this process's CPU time."""

    async def run() -> Sent:
        started_cpu = time.process_time()
        tasks: list[asyncio.Task] = []
        late = 0.0
        async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=60)) as client:

            async def one() -> bool:
                async with client.post(
                    "/classify", data=image, headers={"content-type": "image/jpeg"}
                ) as answer:
                    await answer.read()
                    return answer.status == 200

            started = time.perf_counter()
            for k in range(max(1, round(rate * seconds))):
                due = started + k / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                late = max(late, time.perf_counter() - due)
                tasks.append(asyncio.create_task(one()))
            done = await asyncio.gather(*tasks, return_exceptions=True)
        answered = sum(result is True for result in done)
        return Sent(answered, len(done) - answered, late, time.process_time() - started_cpu)

    return asyncio.run(run())


@dataclass
class Round:
    alone: tuple[float, float]  # images/s, CPU ms per image
    beside: tuple[float, float]
    neighbour_server_ms: float  # CPU ms per request
    neighbour_client_ms: float
    neighbour_cores: float  # the server's and the client's CPU seconds per second
    neighbour_answered: int  # its requests answered 200


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="a classifier bundle")
    parser.add_argument("--batch", type=int, default=2, help="images per engine run")
    parser.add_argument("--rate", type=float, default=36.0, help="neighbour requests/s")
    parser.add_argument(
        "--neighbour-dir",
        type=Path,
        default=DEMO_BUNDLES_DIR / "shapes_classify",
        help="the bundle the neighbour serves (default: the demo classifier)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="engine run per step")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--image-size", default="384x256", help="the JPEG's WxH")
    add_server_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(**server_values(args))
    image = image_of(args)
    bundle = load_bundle(args.model_dir)
    if bundle.manifest.task != "classify":
        raise SystemExit(f"{args.model_dir} is a {bundle.manifest.task} bundle: give a classifier")
    pipeline = pipeline_for(bundle.manifest)
    items = pipeline.prepare(decode_image(image, settings.max_pixels)).items
    batch = (items * args.batch)[: args.batch]
    engines = [engine for engine, _ in instances_of(bundle, settings)]
    neighbour_flags = [
        "--model-dir", str(args.neighbour_dir), "--log-level", "warning",
        "--instances", "1", "--engine-threads", "1",
    ]  # fmt: skip
    print(
        f"engines: {settings.engine} {settings.precision} {settings.instances} x "
        f"{settings.engine_threads} thread(s), batch {args.batch}; neighbour: "
        f"{args.neighbour_dir.name} at {args.rate:g} req/s; {len(os.sched_getaffinity(0))} CPUs"
    )
    rounds: list[Round] = []
    with (
        running_server(neighbour_flags, ready_timeout_s=READY_TIMEOUT_S) as neighbour,
        ProcessPoolExecutor(1, mp_context=get_context("spawn")) as clients,
    ):
        # warm the neighbour and start the client's process
        clients.submit(open_loop, neighbour.url, image, 10.0, 1.0).result()
        pipeline.run_batch(engines[0], batch)
        for index in range(1, args.rounds + 1):
            steps = {}
            for step in round_order(["alone", "beside"], index):
                if step == "alone":
                    with paused(neighbour.process):
                        steps[step] = run_side_by_side(pipeline, engines, batch, args.seconds)
                else:
                    steps[step] = beside(
                        neighbour.process,
                        neighbour.url,
                        clients,
                        lambda: run_side_by_side(pipeline, engines, batch, args.seconds),
                        image,
                        args,
                    )
            rounds.append(Round(steps["alone"], *steps["beside"]))
            report(index, rounds[-1])
    for engine in engines:
        engine.close()
    print(summary(rounds, len(os.sched_getaffinity(0))))
    return 0


def beside(
    process: subprocess.Popen,
    url: str,
    clients: ProcessPoolExecutor,
    run: Callable[[], tuple[float, float]],
    image: bytes,
    args: argparse.Namespace,
) -> tuple[tuple[float, float], float, float, float, int]:
    """`run` (the engines) beside the neighbour at `args.rate`: its figures, and the
    neighbour's server and client CPU ms per request, its CPUs in use and its requests
    answered."""
    sending = clients.submit(open_loop, url, image, args.rate, args.seconds + 2 * LEAD_S)
    time.sleep(LEAD_S)
    pids = process_tree(process.pid)
    server_before, wall_before = cpu_seconds(pids), time.perf_counter()
    figures = run()
    server_s = cpu_seconds(pids) - server_before
    wall = time.perf_counter() - wall_before
    sent = sending.result()
    if sent.failed or sent.late_s > LATE_S:
        print(
            f"  (the neighbour: {sent.failed} requests not answered 200, the last sent "
            f"{sent.late_s * 1000:.0f} ms late: it did not keep the rate)"
        )
    server_ms = server_s / (args.rate * wall) * 1000
    client_ms = sent.cpu_s / max(sent.answered + sent.failed, 1) * 1000
    cpus = server_s / wall + client_ms * args.rate / 1000
    return figures, server_ms, client_ms, cpus, sent.answered


def report(index: int, figures: Round) -> None:
    (alone, alone_ms), (beside, beside_ms) = figures.alone, figures.beside
    print(
        f"round {index}: alone {alone:.1f} img/s, {alone_ms:.1f} CPU ms/img; beside "
        f"{beside:.1f} img/s, {beside_ms:.1f} CPU ms/img; the neighbour: server "
        f"{figures.neighbour_server_ms:.2f} + client {figures.neighbour_client_ms:.2f} CPU "
        f"ms/request, {figures.neighbour_cores:.3f} CPUs, {figures.neighbour_answered} "
        "requests answered"
    )


def summary(rounds: list[Round], cpus: int) -> str:
    """Medians over the rounds of beside / alone: the engines' images/s and CPU per image,
    and the images/s expected if the neighbour took only its own CPU time from them."""
    throughput = [r.beside[0] / r.alone[0] for r in rounds]
    cpu = [r.beside[1] / r.alone[1] for r in rounds]
    expected = [(cpus - r.neighbour_cores) / cpus for r in rounds]

    def spread(values: list[float]) -> str:
        return f"{np.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    return (
        f"over {len(rounds)} rounds, beside / alone: images/s {spread(throughput)}, engine "
        f"CPU ms per image {spread(cpu)}; images/s if the neighbour took only its own CPU "
        f"time {spread(expected)}; the neighbour's CPU ms per request: server "
        f"{np.median([r.neighbour_server_ms for r in rounds]):.2f}, client "
        f"{np.median([r.neighbour_client_ms for r in rounds]):.2f}"
    )


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
