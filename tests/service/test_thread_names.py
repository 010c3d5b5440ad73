"""The server's threads carry names the OS shows (service.thread_names): the event loop's
`hornet-serve`, `hornet-decode`, and `hornet-engine` for the threads that run batches
and every thread the engines start, so `top -H` and bench/loadgen.py tell them apart."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from service import thread_names
from service.testing import running_server
from tests.helpers import demo
from tests.helpers.images import encode

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="thread names are Linux's")

ROLES = {thread_names.SERVE, thread_names.DECODE, thread_names.ENGINE, thread_names.LOG}
# The imports' pools, and uvloop's getaddrinfo threads (libuv names its own).
OTHERS = {thread_names.LIBRARY, "libuv-worker"}


def _comm_of_new_thread() -> str:
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(thread_names.current() or ""))
    thread.start()
    thread.join()
    return seen[0]


def test_a_thread_started_in_the_block_keeps_the_name_the_caller_gets_its_own_back() -> None:
    def body() -> tuple[str | None, str, str | None, str]:
        before = thread_names.current()
        with thread_names.named("hornet-test-abc"):
            inside = _comm_of_new_thread()
        return before, inside, thread_names.current(), _comm_of_new_thread()

    results: list[tuple] = []
    worker = threading.Thread(target=lambda: results.append(body()))
    worker.start()
    worker.join()
    before, inside, after, later = results[0]
    assert inside == "hornet-test-abc"
    assert after == before and later == before


def test_a_name_is_cut_to_the_kernels_fifteen_bytes() -> None:
    seen: list[str | None] = []

    def body() -> None:
        assert thread_names.set_current("hornet-a-very-long-name")
        seen.append(thread_names.current())

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert seen == ["hornet-a-very-l"]


def _thread_names(pid: int) -> list[str]:
    return [(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()]


@pytest.mark.parametrize(
    "flags",
    [
        ["--engine-threads", "2"],
        ["--engine", "openvino", "--instances", "2", "--engine-threads", "1"],
    ],
    ids=["onnxruntime 1x2", "openvino 2x1"],
)
def test_every_thread_of_a_server_process_is_named(flags) -> None:
    """A real server after requests: no thread left with the interpreter's name (the
    engines' pools, OpenVINO's streams and TBB workers included), each role present; the
    threads the imports started, where there are any, named as the libraries'."""
    image = encode(np.random.default_rng(0).integers(0, 256, (256, 384, 3), np.uint8))
    with running_server(["--model-dir", str(demo.bundle_dir("classify")), *flags]) as server:
        for _ in range(20):
            request = urllib.request.Request(
                f"{server.url}/classify", data=image, headers={"content-type": "image/png"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
        names = _thread_names(server.process.pid)
    assert ROLES <= set(names) <= ROLES | OTHERS, names
    assert names.count(thread_names.ENGINE) >= 2, names


def test_threads_started_before_the_server_names_anything_are_named_the_librarys() -> None:
    """In a fresh interpreter: a thread started at import keeps the interpreter's name
    until `name_library_threads`, which names it and leaves the caller's own alone."""
    code = (
        "import threading, time\n"
        "from service import thread_names\n"
        "done = threading.Event()\n"
        "threading.Thread(target=done.wait, daemon=True).start()\n"
        "print(thread_names.name_library_threads(), thread_names.current())\n"
        "import os\n"
        "print(sorted(open(f'/proc/self/task/{t}/comm').read().strip()"
        " for t in os.listdir('/proc/self/task')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    count, own = out[0].split()
    assert int(count) >= 1 and own != thread_names.LIBRARY
    assert thread_names.LIBRARY in out[1] and own in out[1]
