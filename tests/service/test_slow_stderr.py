"""A standard error that nobody reads (a full pipe: a container runtime's log driver that
blocks, a stalled collector) must not stop the server: its log lines are written by a
thread of their own (service.logs.LineWriter), held up to --log-buffer-kib and dropped
past it, counted, and said once the stream takes lines again.

Before: the event loop wrote each line itself, and a real server whose stderr pipe was
not read answered 281 requests and then nothing, its probes included.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time

import httpx

from service.logs import LineWriter
from service.testing import free_port, wait_ready


def _dropped_metric(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("hornet_log_lines_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("no hornet_log_lines_dropped_total")


def test_a_server_whose_stderr_is_not_read_goes_on_answering(tmp_path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--engine-threads", "1"]
    command += ["--log-buffer-kib", "16"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server, timeout_s=60)
        # the pipe's 64 KiB and the 16 KiB held fill after about 350 access lines
        with httpx.Client(base_url=url, timeout=5) as client:
            for _ in range(800):
                assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200
        dropped = _dropped_metric(url)
        assert dropped >= 300
        # Read the pipe again: the lines held come out whole, then one line saying how
        # many were dropped; the server still answers.
        lines: list[str] = []

        def read() -> None:
            for raw in server.stderr:
                lines.append(raw.decode())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while not any("log lines dropped" in line for line in lines):
            assert time.monotonic() < deadline, lines[-3:]
            time.sleep(0.05)
        parsed = [json.loads(line) for line in list(lines)]  # every line whole JSON
        (notice,) = [line for line in parsed if line["message"].startswith("log lines dropped")]
        assert notice["level"] == "warning"
        assert dropped <= notice["dropped"] <= dropped + 2  # + the scrape's own line
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0


class _BlockedStream(io.StringIO):
    """A stream whose writes wait until it is opened."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()

    def write(self, text: str) -> int:
        self.open.wait()
        return super().write(text)


def test_the_writer_never_waits_and_counts_what_it_drops() -> None:
    stream = _BlockedStream()
    writer = LineWriter(stream, capacity_bytes=100)
    started = time.monotonic()
    for index in range(50):
        writer.put(f"line {index:04d} of ten characters and more\n")  # 40 characters
    assert time.monotonic() - started < 1.0  # put never waited on the stream
    # The first line is taken for writing at once (and held in the blocked write): it
    # and one more fit in the 100 characters, the other 48 are dropped.
    assert writer.dropped == 48
    stream.open.set()
    writer.flush(5)
    written = stream.getvalue().splitlines()
    assert written[:2] == [
        "line 0000 of ten characters and more",
        "line 0001 of ten characters and more",
    ]
    assert json.loads(written[2])["dropped"] == 48
    writer.put("after\n")
    writer.flush(5)
    assert stream.getvalue().endswith("after\n") and writer.dropped == 48


def test_a_librarys_warnings_and_errors_are_lines_of_the_json_log() -> None:
    """A Python warning in the server (any thread) and another library's log lines go
    through the log's writer as JSON lines, not in plain text straight to standard error
    (where a full pipe would hold the thread); a library's info lines are not written."""
    script = (
        "import logging, threading, warnings\n"
        "from service.logs import configure_logging, flush_logging\n"
        "configure_logging('info')\n"
        "thread = threading.Thread(target=warnings.warn, args=('a library warned',))\n"
        "thread.start(); thread.join()\n"
        "logging.getLogger('asyncio').error('a transport failed')\n"
        "logging.getLogger('asyncio').info('a chatty library')\n"
        "flush_logging()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    warned, failed = (json.loads(line) for line in done.stderr.splitlines())
    assert warned["level"] == "warning"
    assert "UserWarning: a library warned" in warned["message"]
    assert (failed["level"], failed["message"]) == ("error", "a transport failed")


def test_uvicorns_coloured_template_is_not_a_field_of_the_line() -> None:
    """uvicorn logs its start and end with `color_message`, the message's template with
    terminal colour codes, as an extra: the line keeps the message, not the codes."""
    from service.logs import JsonFormatter

    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Started [%d]", (7,), None
    )
    record.color_message = "Started [\x1b[36m%d\x1b[0m]"
    record.worker = "extras stay"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "Started [7]" and line["worker"] == "extras stay"
    assert "color_message" not in line and "\x1b" not in json.dumps(line)
