"""Graceful shutdown of a real `python -m service` process, as Kubernetes stops a pod.

The kubelet sends SIGTERM (after the preStop sleep) and SIGKILL terminationGracePeriodSeconds
later. Between the two the server must stop accepting, answer what it already holds and exit
within HORNET_DRAIN_TIMEOUT_S (k8s/base/serve.env sizes the grace period from it).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.testing import RunningServer, running_server
from tests.helpers import bundles
from tests.helpers.queueing import metric

PIL = pytest.importorskip("PIL.Image")

STARTUP_TIMEOUT_S = 60.0
# Requests wait this long for their batch to fill: long enough to be in flight at SIGTERM.
BATCH_DELAY_S = 3.0
DRAIN_TIMEOUT_S = 10.0
# Process exit after the drain bound: interpreter teardown on a loaded CI machine.
EXIT_MARGIN_S = 5.0


def _terminate_and_wait(server: RunningServer, bound_s: float) -> tuple[int, float]:
    """SIGTERM, then the exit status and the seconds until the process exited."""
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        status = server.process.wait(timeout=bound_s)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        pytest.fail(f"still running {bound_s:.0f} s after SIGTERM:\n{server.log_tail()}")
    return status, time.monotonic() - sent


def _png() -> bytes:
    buffer = io.BytesIO()
    PIL.new("RGB", (64, 48), (200, 80, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundles.write_classifier(tmp_path_factory.mktemp("bundles") / "tiny_cls", size=64)


@pytest.fixture
def start_server(bundle_dir: Path, tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """`start_server(*flags)`: a ready `python -m service` on a free port (no HORNET_*
    variable from this environment), stopped at teardown if still running."""
    numbers = itertools.count()
    with contextlib.ExitStack() as servers:

        def start(*flags: str) -> RunningServer:
            argv = ["--model-dir", str(bundle_dir), "--engine-threads", "1", *flags]
            server = running_server(
                argv,
                log_path=tmp_path / f"server-{next(numbers)}.log",
                inherit_settings=False,
                ready_timeout_s=STARTUP_TIMEOUT_S,
            )
            return servers.enter_context(server)

        yield start


def _slow_batch_flags(delay_s: float, drain_s: float) -> list[str]:
    """A batch that waits `delay_s` to fill, so requests are still queued at SIGTERM (the
    whole delay: not closed early once nothing more is on its way)."""
    return [
        *("--max-batch-size", "64", "--max-delay-ms", str(delay_s * 1000)),
        "--no-close-batches-early",
        *("--request-timeout-s", str(delay_s + 60), "--drain-timeout-s", str(drain_s)),
    ]


def _classify(url: str) -> httpx.Response:
    return httpx.post(
        f"{url}/classify",
        content=_png(),
        headers={"Content-Type": "image/png"},
        timeout=DRAIN_TIMEOUT_S + 30,
    )


def _queue_depth(url: str) -> float:
    return metric(url, 'hornet_queue_depth{model="tiny_cls"}', timeout_s=2)


def _fire(server: RunningServer, pool: ThreadPoolExecutor, count: int) -> list[Future]:
    """`count` concurrent requests, returned once all of them wait in the batch queue."""
    requests = [pool.submit(_classify, server.url) for _ in range(count)]
    give_up_at = time.monotonic() + BATCH_DELAY_S / 2
    while _queue_depth(server.url) < count:
        assert time.monotonic() < give_up_at, f"requests never queued:\n{server.log_tail()}"
        time.sleep(0.05)
    return requests


def _refuses_connections(url: str, within_s: float) -> bool:
    give_up_at = time.monotonic() + within_s
    while time.monotonic() < give_up_at:
        try:
            httpx.get(f"{url}/healthz", timeout=0.5)
        except httpx.ConnectError:
            return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


def test_exit_signal_turns_readiness_false_before_the_server_stops(bundle_dir: Path):
    """Probes see 503 "draining" from the moment SIGTERM arrives, not once uvicorn reacts."""
    server_module = pytest.importorskip("service.cli")
    from fastapi.testclient import TestClient

    from hornet_bundle import load_bundle
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(model_dir=[bundle_dir]), bundles=[load_bundle(bundle_dir)])
    server = server_module._DrainingServer(uvicorn.Config(app), app.state.pool)
    with TestClient(app) as client:
        give_up_at = time.monotonic() + STARTUP_TIMEOUT_S
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < give_up_at, "never ready"
            time.sleep(0.05)
        server.handle_exit(signal.SIGTERM, None)
        readiness = client.get("/readyz")
    assert server.should_exit
    assert readiness.status_code == 503 and readiness.json()["status"] == "draining"


def test_sigterm_answers_every_queued_request_within_the_drain_bound(start_server):
    server = start_server(*_slow_batch_flags(BATCH_DELAY_S, DRAIN_TIMEOUT_S))
    with ThreadPoolExecutor(4) as pool:
        requests = _fire(server, pool, 4)
        _, seconds = _terminate_and_wait(server, DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
        responses = [r.result() for r in requests]
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert all(len(r.json()["results"]) == 1 for r in responses)
    assert seconds >= BATCH_DELAY_S / 2, "exited before the queued batch could have run"


def test_sigterm_stops_accepting_while_requests_are_still_in_flight(start_server):
    server = start_server(*_slow_batch_flags(BATCH_DELAY_S, DRAIN_TIMEOUT_S))
    with ThreadPoolExecutor(2) as pool:
        requests = _fire(server, pool, 2)
        server.process.send_signal(signal.SIGTERM)
        refused = _refuses_connections(server.url, within_s=BATCH_DELAY_S / 2)
        still_in_flight = not any(r.done() for r in requests)
        responses = [r.result() for r in requests]
        server.process.wait(timeout=DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
    assert refused, "new connections were still accepted after SIGTERM"
    assert still_in_flight, "the queued requests finished before the check; raise BATCH_DELAY_S"
    assert [r.status_code for r in responses] == [200, 200]


def test_idle_server_stops_promptly_on_sigterm(start_server):
    server = start_server("--drain-timeout-s", str(DRAIN_TIMEOUT_S))
    _, seconds = _terminate_and_wait(server, DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
    assert seconds < EXIT_MARGIN_S, f"an idle server took {seconds:.1f} s to stop"


def test_graceful_shutdown_exits_with_status_zero(start_server):
    server = start_server("--drain-timeout-s", str(DRAIN_TIMEOUT_S))
    status, _ = _terminate_and_wait(server, DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
    assert status == 0, f"exit status {status}:\n{server.log_tail()}"


def test_a_request_longer_than_the_drain_bound_does_not_hold_the_process(start_server):
    """The bound is the drain timeout once: the batch queues close when it runs out."""
    drain_s = 1.0
    server = start_server(*_slow_batch_flags(60.0, drain_s))
    with ThreadPoolExecutor(1) as pool:
        _fire(server, pool, 1)
        _, seconds = _terminate_and_wait(server, drain_s + EXIT_MARGIN_S)
    assert seconds < drain_s + EXIT_MARGIN_S


def test_a_request_cut_off_by_the_drain_bound_is_told_to_retry(start_server):
    server = start_server(*_slow_batch_flags(60.0, drain_s=1.0))
    with ThreadPoolExecutor(1) as pool:
        (request,) = _fire(server, pool, 1)
        _terminate_and_wait(server, 2 + EXIT_MARGIN_S)
        response = request.result()
    assert response.status_code == 503 and "Retry-After" in response.headers, response.text
