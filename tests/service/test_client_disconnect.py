"""A client that hangs up while its body is read is nobody's error: counted as 499, no
error line, the server unaffected (found by bench/soak.py as 500s)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from service.testing import running_server

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
