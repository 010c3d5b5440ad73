"""The same image through each of the server's protocols, side by side: the image route
(`POST /classify`, the raw JPEG as the body), KServe v2 over REST (`POST
/v2/models/M/infer`, the JPEG as a BYTES input in the binary extension), KServe v2 over
gRPC (`ModelInfer`, the JPEG in raw_input_contents; `--grpc-port`) and Triton's streaming
form of it (`ModelStreamInfer`: each client keeps one stream open and sends its next
request on it once the last is answered; the server keeps at most 8 streams by default,
so at most 8 clients).

    python bench/protocols.py --model-dir BUNDLE --concurrency 1,8 --rounds 3 --duration 15

One server (`python -m service`, with loadgen's server flags and a gRPC port) serves all
three; before anything is timed each protocol's answer is checked to give the same top
class. Then, round after round and in alternating order, each protocol gets the same
closed loop of --concurrency clients for --duration seconds (asyncio clients in this
process: aiohttp for REST, grpcio's asyncio channel for gRPC, with tritonclient's message
definitions). Printed per protocol: images/s, p50 and p99 latency, the clients' and the
server's CPU per image, and the ratio of images/s and p99 to the image route's in the same
round (median and range over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import (  # noqa: E402 - after the path insert
    LoadResult,
    add_server_arguments,
    cpu_seconds,
    process_tree,
    server_flags,
    serving,
    test_image,
)
from hornet_bundle import load_bundle  # noqa: E402
from service.testing import LOOPBACK, free_port  # noqa: E402

PROTOCOLS = ("classify", "v2-rest", "v2-grpc", "v2-grpc-stream")
# One request: send it, wait for its answer; True when it succeeded.
Send = Callable[[], Awaitable[bool]]


def v2_body(image: bytes) -> tuple[bytes, int]:
    """A KServe v2 REST request with the image as a one-element BYTES input in the binary
    tensor extension, asking for the probabilities; and its JSON header's length."""
    element = struct.pack("<I", len(image)) + image
    header = {
        "inputs": [
            {
                "name": "encoded_image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(element)},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    text = json.dumps(header).encode()
    return text + element, len(text)


def grpc_request(model: str, image: bytes):
    """The same request as a ModelInferRequest (tritonclient's definition of it)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="encoded_image", datatype="BYTES", shape=[1])
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return request


def grpc_aio_eof() -> object:
    """grpc.aio's end-of-stream marker, which a stream's read() returns."""
    from grpc import aio

    return aio.EOF


async def closed_loop(send: Send, concurrency: int, seconds: float) -> LoadResult:
    """`concurrency` clients each calling `send` and waiting for it, for `seconds`."""
    latencies: list[float] = []
    failures = 0
    started = time.perf_counter()
    stop_at = started + seconds

    async def client() -> None:
        nonlocal failures
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            if await send():
                latencies.append(time.perf_counter() - sent)
            else:
                failures += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    errors = {0: failures} if failures else {}
    return LoadResult(concurrency, len(latencies), errors, time.perf_counter() - started, latencies)


class Clients:
    """One open client per protocol and the request each sends; `top_class` asks each
    once for the image's best class."""

    def __init__(self, url: str, grpc_port: int, model: str, image: bytes, limit: int):
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.model, self.image = model, image
        self.http = aiohttp.ClientSession(
            url,
            connector=aiohttp.TCPConnector(limit=limit),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self.channel = grpc.aio.insecure_channel(
            f"{LOOPBACK}:{grpc_port}", options=[("grpc.enable_http_proxy", 0)]
        )
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.response_type = service_pb2.ModelInferResponse
        self.v2_body, self.v2_header_length = v2_body(image)
        self.grpc_request = grpc_request(model, image)

        self.streams: list = []  # open ModelStreamInfer calls, none waiting for an answer

    async def close(self) -> None:
        await self.http.close()
        for stream in self.streams:
            await stream.done_writing()
        await self.channel.close()

    async def classify(self) -> dict:
        async with self.http.post(
            "/classify",
            params={"model": self.model, "top_k": 1},
            data=self.image,
            headers={"content-type": "image/jpeg"},
        ) as answer:
            return json.loads(await answer.read()) if answer.status == 200 else {}

    async def v2_rest(self) -> tuple[int, bytes, int]:
        async with self.http.post(
            f"/v2/models/{self.model}/infer",
            data=self.v2_body,
            headers={
                "content-type": "application/octet-stream",
                "inference-header-content-length": str(self.v2_header_length),
            },
        ) as answer:
            length = int(answer.headers.get("inference-header-content-length", 0))
            return answer.status, await answer.read(), length

    async def v2_grpc(self):
        return await self.stub.ModelInfer(self.grpc_request, timeout=60)

    async def v2_grpc_stream(self):
        """The request on an idle stream (a new one if none is idle), and its answer; the
        stream is kept for the next request unless it broke."""
        stream = self.streams.pop() if self.streams else self.stub.ModelStreamInfer()
        await stream.write(self.grpc_request)
        answer = await stream.read()
        if answer is grpc_aio_eof():
            raise RuntimeError("the stream ended without an answer")
        self.streams.append(stream)
        if answer.error_message:
            raise RuntimeError(answer.error_message)
        return answer.infer_response

    def senders(self) -> dict[str, Send]:
        async def classify() -> bool:
            return bool(await self.classify())

        async def rest() -> bool:
            return (await self.v2_rest())[0] == 200

        def succeeded(call: Callable[[], Awaitable[object]]) -> Send:
            async def send() -> bool:
                try:
                    await call()
                except Exception:  # noqa: BLE001 - an RpcError, a broken stream, an error answer
                    return False
                return True

            return send

        return {
            "classify": classify,
            "v2-rest": rest,
            "v2-grpc": succeeded(self.v2_grpc),
            "v2-grpc-stream": succeeded(self.v2_grpc_stream),
        }

    async def top_classes(self) -> dict[str, int]:
        """Each protocol's best class for the image."""
        import numpy as np

        classify = (await self.classify())["results"][0]["top_k"][0]["index"]
        status, body, length = await self.v2_rest()
        if status != 200:
            raise SystemExit(f"v2 REST answered {status}: {body[:300]!r}")
        rest = int(np.frombuffer(body[length:], dtype="<f4").argmax())
        answer = await self.v2_grpc()
        grpc_top = int(np.frombuffer(answer.raw_output_contents[0], dtype="<f4").argmax())
        streamed = await self.v2_grpc_stream()
        stream_top = int(np.frombuffer(streamed.raw_output_contents[0], dtype="<f4").argmax())
        return {"classify": classify, "v2-rest": rest, "v2-grpc": grpc_top,
                "v2-grpc-stream": stream_top}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a classifier bundle")
    parser.add_argument("--image-size", default="384x256", help="WxH of loadgen's photo")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = load_bundle(args.model_dir).manifest
    if manifest.task != "classify":
        raise SystemExit(f"{args.model_dir} is a {manifest.task} bundle; give a classifier")
    width, height = (int(x) for x in args.image_size.split("x"))
    image = test_image((width, height))
    port = free_port()
    flags = [*server_flags(args), "--grpc-port", str(port)]
    with serving(None, flags) as (url, process):
        assert process is not None
        server_pids = process_tree(process.pid)
        return asyncio.run(_run(args, url, port, manifest.name, image, server_pids))


async def _run(
    args: argparse.Namespace,
    url: str,
    port: int,
    model: str,
    image: bytes,
    server_pids: list[int],
) -> int:
    clients = Clients(url, port, model, image, max(args.levels))
    try:
        tops = await clients.top_classes()
        if len(set(tops.values())) != 1:
            raise SystemExit(f"the protocols disagree on the top class: {tops}")
        print(
            f"model {model}; image {len(image)} bytes; "
            f"top class {tops['classify']} by all {len(tops)}"
        )
        senders = clients.senders()
        for send in senders.values():  # warm each path
            await closed_loop(send, 2, 1.0)
        rows: dict[tuple[int, str], list[tuple[float, float, float, float, float]]] = {}
        header = f"{'round':>5} {'conc':>4} {'protocol':14} {'img/s':>7} {'p50 ms':>7} "
        print(header + f"{'p99 ms':>7} {'client ms/img':>13} {'server ms/img':>13}")
        for round_ in range(args.rounds):
            for level in args.levels:
                order = PROTOCOLS if round_ % 2 == 0 else PROTOCOLS[::-1]
                for name in order:
                    client_before = _own_cpu()
                    server_before = cpu_seconds(server_pids)
                    result = await closed_loop(senders[name], level, args.duration)
                    client_ms = 1000 * (_own_cpu() - client_before) / max(result.ok, 1)
                    server_ms = (
                        1000 * (cpu_seconds(server_pids) - server_before) / max(result.ok, 1)
                    )
                    figures = (result.throughput, result.percentile(50), result.percentile(99),
                               client_ms, server_ms)  # fmt: skip
                    rows.setdefault((level, name), []).append(figures)
                    failed = f"  {sum(result.errors.values())} failed" if result.errors else ""
                    print(
                        f"{round_ + 1:>5} {level:>4} {name:14} {figures[0]:7.1f} {figures[1]:7.1f} "
                        f"{figures[2]:7.1f} {client_ms:13.2f} {server_ms:13.2f}{failed}",
                        flush=True,
                    )
        print(summary(rows, args.levels))
    finally:
        await clients.close()
    return 0


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def summary(rows: dict, levels: list[int]) -> str:
    """Medians per protocol, and each protocol's images/s and p99 over the image route's,
    round by round (median and range)."""
    lines = []
    for level in levels:
        lines.append(f"\nconcurrency {level}, medians over the rounds:")
        base = rows[(level, "classify")]
        for name in PROTOCOLS:
            runs = rows[(level, name)]
            medians = [statistics.median(run[i] for run in runs) for i in range(5)]
            line = (
                f"  {name:14} {medians[0]:7.1f} img/s  p50 {medians[1]:6.1f}  p99 {medians[2]:6.1f}"
                f"  client {medians[3]:5.2f} ms/img  server {medians[4]:6.2f} ms/img"
            )
            if name != "classify":
                speed = [run[0] / ref[0] for run, ref in zip(runs, base, strict=True)]
                tail = [run[2] / ref[2] for run, ref in zip(runs, base, strict=True)]
                line += (
                    f"  / classify: img/s {statistics.median(speed):.2f} "
                    f"({min(speed):.2f}-{max(speed):.2f}), p99 {statistics.median(tail):.2f}"
                )
            lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
