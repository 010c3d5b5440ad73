"""--metrics-port against a real server process: /metrics and the health probes on a port
of their own, with its own --max-connections, so a client that holds every connection
the API port allows does not fail the kubelet's probes (which restart the pod) or
Prometheus' scrapes. Before it, the probes shared the API port's places: with them all
held, /healthz was answered 503 `too_many_connections` like any other request.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from service.healthcheck import probed_port
from service.settings import Settings
from service.testing import RunningServer, free_port, running_server
from tests.helpers.raw_http import (
    connect,
    get,
    parse_answer,
    read_one_answer,
    read_until_closed,
    send,
)

REPO = Path(__file__).resolve().parents[2]
LIMIT = 4
KEY = "metrics-port-test-key-0123456789"
JPEG = {"content-type": "image/jpeg"}


def _samples(url: str, **headers: str) -> dict[tuple[str, str], float]:
    """(name, listener label or "") -> value, from the server's /metrics."""
    answer = httpx.get(f"{url}/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, sample.labels.get("listener", "")): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def _hold(url: str, count: int) -> list[socket.socket]:
    """`count` connections to `url`, each answered once (so the server has taken it)."""
    held = [connect(url) for _ in range(count)]
    for connection in held:
        assert send(connection, get("/healthz"))
        assert read_one_answer(connection)[0] == 200
    return held


def _refused(url: str) -> dict:
    status, _, body = parse_answer(read_until_closed(connect(url)))
    assert status == 503
    return json.loads(body)


class Served:
    def __init__(self, running: RunningServer, metrics_port: int) -> None:
        self.running = running
        self.url = running.url
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"


@pytest.fixture
def served(http_parser, classifier_dir: Path, tmp_path: Path) -> Iterator[Served]:
    metrics_port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--http-parser", http_parser]
    flags += ["--max-connections", str(LIMIT), "--metrics-port", str(metrics_port)]
    with running_server(
        flags, log_path=tmp_path / "server.log", memory_limit_bytes=6 << 30
    ) as running:
        yield Served(running, metrics_port)


def test_a_flooded_api_port_leaves_the_metrics_port_its_places(served: Served) -> None:
    held = _hold(served.url, LIMIT)
    try:
        assert _refused(served.url)["error"] == "too_many_connections"
        # the probes and the scrape get through on their own port
        for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
            answer = httpx.get(f"{served.metrics_url}{path}")
            assert answer.status_code == 200 and answer.json()["status"] == status
        assert httpx.get(f"{served.metrics_url}/v2/health/ready").json() == {"ready": True}
        counted = _samples(served.metrics_url)
        assert counted[("hornet_connections_refused_total", "api")] == 1
        assert counted[("hornet_connections_refused_total", "metrics")] == 0
        assert counted[("hornet_http_connections", "api")] == LIMIT
        assert counted[("hornet_http_connections", "metrics")] == 1  # the scrape's own
    finally:
        for connection in held:
            connection.close()
    # and the other way round: the metrics port full, the API port serves
    held = _hold(served.metrics_url, LIMIT)
    try:
        assert "this port of the server holds its 4" in _refused(served.metrics_url)["detail"]
        assert httpx.get(f"{served.url}/v1/models").status_code == 200
        counted = _samples(served.url)
        assert counted[("hornet_connections_refused_total", "metrics")] == 1
        assert counted[("hornet_http_connections", "metrics")] == LIMIT
    finally:
        for connection in held:
            connection.close()
    log = [json.loads(line) for line in served.running.log_path.read_text().splitlines()]
    said = {
        line["listener"]: line for line in log if line["message"].startswith("connections refused")
    }
    assert said["api"]["message"].startswith("connections refused on the api port")
    assert said["metrics"]["refused"] == 1 and said["metrics"]["max_connections"] == LIMIT


def test_the_metrics_port_serves_nothing_else(served: Served, photos) -> None:
    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(buffer, format="JPEG")
    cat_jpeg = buffer.getvalue()
    for path in ("/v1/models", "/", "/docs", "/openapi.json"):
        assert httpx.get(f"{served.url}{path}").status_code == 200
        answer = httpx.get(f"{served.metrics_url}{path}")
        assert answer.status_code == 404, path
        assert answer.json() == {
            "error": "not_found",
            "detail": f"{path} is not served on the metrics port (it serves /healthz, "
            "/metrics, /readyz, /v2/health/live, /v2/health/ready)",
        }
    # an upload is answered without being read, and its connection closed
    answer = httpx.post(f"{served.metrics_url}/classify", content=cat_jpeg, headers=JPEG)
    assert answer.status_code == 404 and answer.headers["connection"] == "close"
    # under /v2 in the Open Inference Protocol's shape
    answer = httpx.post(f"{served.metrics_url}/v2/models/classifier/infer", json={"inputs": []})
    assert answer.status_code == 404
    assert answer.json()["error"].startswith("not_found: /v2/models/classifier/infer is not")
    # the API port still answers them
    assert httpx.post(f"{served.url}/classify", content=cat_jpeg, headers=JPEG).status_code == 200


@pytest.mark.parametrize("protect_probes", [False, True])
def test_api_keys_apply_on_the_metrics_port_as_on_the_api_port(
    classifier_dir: Path, tmp_path: Path, protect_probes: bool
) -> None:
    metrics_port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--api-key", KEY]
    flags += ["--metrics-port", str(metrics_port)]
    flags += ["--protect-probes"] if protect_probes else []
    keyed = {"Authorization": f"Bearer {KEY}"}
    with running_server(flags, log_path=tmp_path / "server.log", ready_headers=keyed) as running:
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        for url in (running.url, metrics_url):
            for path in ("/metrics", "/healthz", "/readyz"):
                answer = httpx.get(f"{url}{path}")
                assert answer.status_code == (401 if protect_probes else 200), (url, path)
                assert httpx.get(f"{url}{path}", headers=keyed).status_code == 200
        # a key opens nothing more on the metrics port
        assert httpx.get(f"{metrics_url}/v1/models", headers=keyed).status_code == 404


@pytest.mark.parametrize("taken_flag", ["--port", "--metrics-port"])
def test_a_port_in_use_stops_the_server(classifier_dir: Path, taken_flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {"--port": free_port(), "--metrics-port": free_port()}
        ports[taken_flag] = taken.getsockname()[1]
        command = [sys.executable, "-m", "service", "--model-dir", str(classifier_dir)]
        command += [str(part) for flag_port in ports.items() for part in flag_port]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"hornet serve: {taken_flag} {ports[taken_flag]}: " in done.stderr
    assert "address already in use" in done.stderr
    assert "try the models in a browser" not in done.stderr  # it never said it was up
    for port in ports.values():  # the other port was let go with the process
        with socket.socket() as again:
            again.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"port": 8000, "metrics_port": 8000}, "--port and --metrics-port are both 8000"),
        ({"grpc_port": 8001, "metrics_port": 8001}, "--grpc-port and --metrics-port are both"),
        ({"port": 8001, "grpc_port": 8001}, "--port and --grpc-port are both 8001"),
    ],
)
def test_each_port_is_its_own(given: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**given)
    Settings(port=0, grpc_port=0, metrics_port=0)  # 0: any port, no gRPC, no metrics port


def test_the_images_health_check_probes_the_metrics_port(served: Served) -> None:
    """The Dockerfiles' HEALTHCHECK: with HORNET_METRICS_PORT set it asks that port, so it
    passes while the API port is full (here: not even listening where HORNET_PORT says)."""
    metrics_port = served.metrics_url.rsplit(":", 1)[1]
    closed = str(free_port())
    command = [sys.executable, "-m", "service.healthcheck"]
    for env, code in (
        ({"HORNET_METRICS_PORT": metrics_port, "HORNET_PORT": closed}, 0),
        ({"HORNET_PORT": closed}, 1),
        ({"HORNET_METRICS_PORT": "0", "HORNET_PORT": closed}, 1),
    ):
        done = subprocess.run(command, env={**env, "PATH": ""}, cwd=REPO, timeout=60)
        assert done.returncode == code, env
    assert probed_port({"HORNET_METRICS_PORT": " 0 ", "HORNET_PORT": "9"}) == "9"


def test_shutdown_closes_the_metrics_port_too(classifier_dir: Path, tmp_path: Path) -> None:
    """SIGTERM with a keep-alive connection open on the metrics port: the server drains
    and exits 0 in its drain bound, the port no longer listening."""
    metrics_port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--metrics-port", str(metrics_port)]
    flags += ["--drain-timeout-s", "1"]
    with running_server(flags, log_path=tmp_path / "server.log") as running:
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        idle = _hold(metrics_url, 1)[0]
        begun = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=30) == 0
        assert time.monotonic() - begun < 10
        assert read_until_closed(idle) == b""  # closed by the server
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{metrics_url}/healthz")
