"""A client that hangs up while its body is read is nobody's error: counted as 499, no
error line, the server unaffected (found by bench/soak.py as 500s)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.testing import running_server
from tests.helpers.queueing import metric, queued_photo, wait_for_metric

PNG_START = b"\x89PNG\r\n\x1a\n" + b"\0" * 1000
MULTIPART_START = (
    b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n" + PNG_START
)


def _hang_up_mid_body(base_url: str, path: str, content_type: str, start: bytes) -> None:
    """Declare a 100 kB body, send its first kilobyte, close the connection."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 100000\r\n\r\n"
        )
        sock.sendall(head.encode() + start)
        time.sleep(0.2)


def _count(metrics: str, route: str, status: str) -> float:
    prefix = f'hornet_requests_total{{route="{route}",status="{status}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_a_client_hanging_up_mid_body_is_a_499_without_an_error_line(
    classifier_dir: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    flags = ["--model-dir", str(classifier_dir), "--max-batch-size", "4", "--engine-threads", "1"]
    server = running_server([*flags, "--max-delay-ms", "5"], log_path=log_path)
    with server as (base_url, process, _):
        _hang_up_mid_body(base_url, "/classify", "image/png", PNG_START)
        _hang_up_mid_body(base_url, "/classify", "multipart/form-data; boundary=x", MULTIPART_START)
        v2_infer = "/v2/models/tiny_cls/infer"
        _hang_up_mid_body(base_url, v2_infer, "application/json", b'{"inputs": [')
        give_up_at = time.monotonic() + 10
        while time.monotonic() < give_up_at:
            metrics = httpx.get(f"{base_url}/metrics").text
            if _count(metrics, "/classify", "499") >= 2:
                break
            time.sleep(0.1)
        assert _count(metrics, "/classify", "499") == 2
        assert _count(metrics, "/v2/models/{model}/infer", "499") == 1
        assert 'status="500"' not in metrics
        assert httpx.get(f"{base_url}/readyz").status_code == 200
        assert process.poll() is None
    log = log_path.read_text()
    assert "unhandled error" not in log and "Exception in ASGI application" not in log


DEPTH = 'hornet_queue_depth{model="slow_cls"}'
DECODED = 'hornet_decode_seconds_count{model="slow_cls"}'
BULK = 8  # queued ahead of the departed request: about 0.36 s of engine


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_client_gone_while_queued_never_reaches_the_engine(
    slow_classifier_dir: Path, tmp_path: Path, parser: str
) -> None:
    """A client that sent its whole request and hung up while it waited in the queue:
    its image is dropped before the engine (the batch log never names it), counted as
    499; the requests around it are answered. With either HTTP parser (each marks a
    lost connection its own way; Starlette's Request.is_disconnected reads it)."""
    image = queued_photo(2)
    log = tmp_path / "server.log"
    flags = [
        "--model-dir", str(slow_classifier_dir), "--instances", "1", "--engine-threads", "1",
        "--max-batch-size", "1", "--log-level", "debug", "--http-parser", parser,
    ]  # fmt: skip
    with running_server(flags, log_path=log, inherit_settings=False) as server:
        statuses: list[int] = []

        def post() -> None:
            answer = httpx.post(
                f"{server.url}/classify",
                content=image,
                headers={"content-type": "image/jpeg"},
                timeout=30,
            )
            statuses.append(answer.status_code)

        before = threading.Thread(target=post)  # in the engine while the rest queue
        before.start()
        bulk = [threading.Thread(target=post) for _ in range(BULK)]
        for thread in bulk:
            thread.start()
        # every one decoded, so queued (the queue's depth, read instead, could fall
        # below a bound as the engine took them, before the next arrived)
        wait_for_metric(server.url, DECODED, 1 + BULK)
        assert metric(server.url, DEPTH) >= 3  # work ahead of the departed one
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            head = (
                f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
                f"X-Request-ID: gone-while-queued\r\nContent-Length: {len(image)}\r\n\r\n"
            )
            sock.sendall(head.encode() + image)
            wait_for_metric(server.url, DECODED, 2 + BULK)  # decoded: queued behind them
        after = threading.Thread(target=post)  # queued behind the departed one
        after.start()
        for thread in [before, *bulk, after]:
            thread.join(30)
        time.sleep(0.3)
        metrics = httpx.get(f"{server.url}/metrics").text
    assert statuses == [200] * (2 + BULK)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    ran = [line["request_ids"] for line in lines if line.get("message") == "batch ran"]
    assert len(ran) == 2 + BULK and all("gone-while-queued" not in ids for ids in ran)
    assert _count(metrics, "/classify", "499") == 1.0
