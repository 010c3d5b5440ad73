"""A real `hornet serve` process on a loopback port, for integration tests and benchmarks.

    with running_server(["--model-dir", "bundles/tiny"], log_path=Path("serve.log")) as server:
        urllib.request.urlopen(f"{server.url}/v1/models")

`running_server` starts `python -m service` with the given flags on a free 127.0.0.1
port, its address space capped if asked, and returns once its readiness probe answers
200; a server that exits or never gets ready fails with the end of its log. A server
still running at the end gets SIGTERM (it drains), then SIGKILL. The standard library
only, so it works wherever the service is installed; the repository's tests and
bench/ scripts start their servers with it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import NamedTuple

LOOPBACK = "127.0.0.1"


def direct_opener(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    """An opener that goes straight to the loopback port, whatever HTTP(S)_PROXY says;
    HTTPS checked with `context` (the default's otherwise)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def answers_200(
    opener: urllib.request.OpenerDirector, probe: urllib.request.Request | str, timeout_s: float
) -> bool:
    """Whether `probe` is answered 200 within `timeout_s`; False for any other status,
    a refused or reset connection, a timeout or a TLS failure."""
    try:
        with opener.open(probe, timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, 503, TLS...
        return False


class ServerNotReady(RuntimeError):
    """The server exited, or its readiness probe did not answer 200 in time."""


class RunningServer(NamedTuple):
    url: str
    process: subprocess.Popen
    log_path: Path | None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output (empty when it went to this process's stderr)."""
        return _tail(self.log_path, chars)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_ready(
    url: str,
    process: subprocess.Popen | None = None,
    *,
    timeout_s: float = 60.0,
    path: str = "/readyz",
    headers: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    ca_file: Path | None = None,
) -> None:
    """Return once GET `url``path` answers 200; raise ServerNotReady, with the end of
    `log_path`, when `process` exits first or `timeout_s` passes. `ca_file`: the
    certificate authority an https `url`'s certificate is checked against."""
    probe = urllib.request.Request(f"{url}{path}", headers=dict(headers or {}))
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    opener = direct_opener(context)
    give_up_at = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise ServerNotReady(
                f"the server exited with status {process.returncode}{_log_note(log_path)}"
            )
        if answers_200(opener, probe, 1.0):
            return
        if time.monotonic() >= give_up_at:
            raise ServerNotReady(
                f"{url}{path} did not answer 200 within {timeout_s:g} s{_log_note(log_path)}"
            )
        time.sleep(0.1)


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM a server still running, SIGKILL it if it has not exited `timeout_s` later;
    its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


@contextlib.contextmanager
def running_server(
    flags: Sequence[str] = (),
    *,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    inherit_settings: bool = True,
    memory_limit_bytes: int | None = None,
    open_files_soft_limit: int | None = None,
    cpus: Set[int] | None = None,
    ready_headers: Mapping[str, str] | None = None,
    ready_path: str = "/readyz",
    ready_timeout_s: float = 60.0,
    stop_timeout_s: float = 30.0,
    tls_ca_file: Path | None = None,
    cwd: Path | None = None,
) -> Iterator[RunningServer]:
    """`python -m service *flags` on a free loopback port, ready; stopped at the end.

    log_path: where the server's output (its JSON log lines, on stderr) is written;
        None: this process's stderr.
    env: variables set for the server over this process's environment; with
        `inherit_settings=False` this process's HORNET_* variables are left out, so
        the server reads only `flags`, `env` and its defaults.
    memory_limit_bytes: the server's address space (RLIMIT_AS), so that a runaway
        allocation fails the server instead of the machine.
    open_files_soft_limit: the soft limit on open files the server starts with.
    cpus: the CPUs the server may run on (its affinity, as `taskset` sets it; Linux).
    ready_headers: sent with the readiness probe (a key, when probes are protected).
    ready_path: the route whose 200 means started (/healthz: up, whether or not ready).
    tls_ca_file: the server serves HTTPS (--tls-certfile among `flags`) with a
        certificate this authority signed: the URL is https and the probe checks it.
    cwd: the server's working directory (`python -m service` imports the `service`
        package found there first: another source tree's, bench/revisions.py).
    """
    port = free_port()
    environment = {
        name: value
        for name, value in os.environ.items()
        if inherit_settings or not name.startswith("HORNET_")
    }
    environment.update(env or {})
    command = [sys.executable, "-m", "service", *flags, "--port", str(port)]
    with contextlib.ExitStack() as files:
        if log_path is None:
            stdout, stderr = subprocess.DEVNULL, None
        else:
            stdout, stderr = files.enter_context(log_path.open("w")), subprocess.STDOUT
        process = subprocess.Popen(
            _limited(command, memory_limit_bytes, open_files_soft_limit, cpus),
            env=environment,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
        )
    url = f"{'https' if tls_ca_file else 'http'}://{LOOPBACK}:{port}"
    try:
        wait_ready(
            url,
            process,
            timeout_s=ready_timeout_s,
            path=ready_path,
            headers=ready_headers,
            log_path=log_path,
            ca_file=tls_ca_file,
        )
        yield RunningServer(url, process, log_path)
    finally:
        stop(process, stop_timeout_s)


# Run by the server's own interpreter before it becomes the server (os.execv keeps the
# pid): the limits set in the child without a `preexec_fn`. A preexec_fn makes Popen fork
# rather than vfork, and a fork runs the parent's fork handlers in the child: gRPC's (a
# test process that has used a gRPC client) restarted its poller there, and the child's
# closing of inherited descriptors then killed it with SIGABRT before it exec'd.
_LIMITS_SHIM = """
import json, os, resource, sys
cpus, limit, files = json.loads(sys.argv[1])
if cpus is not None:
    os.sched_setaffinity(0, cpus)
if limit is not None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
if files is not None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, hard))
os.execv(sys.argv[2], sys.argv[2:])
"""


def _limited(
    command: list[str],
    limit_bytes: int | None,
    open_files_soft_limit: int | None,
    cpus: Set[int] | None = None,
) -> list[str]:
    """`command`, started under the limits (through `_LIMITS_SHIM`) where any is given."""
    if limit_bytes is None and open_files_soft_limit is None and cpus is None:
        return command
    limits = json.dumps(
        [sorted(cpus) if cpus is not None else None, limit_bytes, open_files_soft_limit]
    )
    return [sys.executable, "-c", _LIMITS_SHIM, limits, *command]


def _tail(log_path: Path | None, chars: int) -> str:
    if log_path is None or not log_path.is_file():
        return ""
    return log_path.read_text(errors="replace")[-chars:]


def _log_note(log_path: Path | None) -> str:
    tail = _tail(log_path, 4000)
    return f"; the end of {log_path}:\n{tail}" if tail else ""
