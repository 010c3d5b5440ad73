"""The server's threads named for the operating system, so that `top -H`, `ps -L`,
`perf`, `/proc/PID/task/*/comm` and `bench/loadgen.py` can tell where the CPU goes.

Python (before 3.14) names its threads for itself only: the kernel sees every thread of
the server as `python`, the event loop, the decoding threads and the engines' own native
threads (ONNX Runtime's and OpenVINO's pools) alike. A thread a library starts inherits
the name of the thread that starts it (Linux copies it), so naming the thread that builds
and warms the engines, and the threads that run them, names the libraries' threads too:

- `hornet-serve`: the main thread, which runs the event loop (HTTP, routes, batching);
- `hornet-decode`: the decoding and preprocessing threads;
- `hornet-engine`: the threads that run batches and every thread an engine started;
- `hornet-log`: the thread that writes the log lines to standard error;
- `hornet-lib`: the threads libraries start when imported, before the server names
  anything (numpy's OpenBLAS, OpenCV's and ONNX Runtime's pools), which work for
  whichever thread calls them.

Linux only (`prctl(PR_SET_NAME)`, 15 bytes at most); elsewhere nothing is renamed."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path

SERVE = "hornet-serve"
DECODE = "hornet-decode"
ENGINE = "hornet-engine"
LIBRARY = "hornet-lib"
LOG = "hornet-log"

_PR_SET_NAME = 15
_MAX_BYTES = 15  # the kernel's TASK_COMM_LEN less the terminating NUL


@cache
def _prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def current() -> str | None:
    """This thread's name as the kernel has it; None where it cannot be read."""
    try:
        return Path("/proc/thread-self/comm").read_text().rstrip("\n")
    except OSError:
        return None


def set_current(name: str) -> bool:
    """Name the calling thread (cut to 15 bytes); True if the kernel took it."""
    prctl = _prctl()
    if prctl is None:
        return False
    raw = name.encode("ascii", "replace")[:_MAX_BYTES]
    return prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0


def name_library_threads() -> int:
    """Name `LIBRARY` every other thread of this process that still has the calling
    thread's name (the interpreter's, inherited by the threads the imports started);
    call it from the main thread before naming it. Returns how many were named."""
    own = current()
    if own is None or _prctl() is None:
        return 0
    me, named_count = str(threading.get_native_id()), 0
    for task in Path("/proc/self/task").iterdir():
        if task.name == me:
            continue
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().rstrip("\n") == own:
                (task / "comm").write_text(LIBRARY)
                named_count += 1
    return named_count


@contextlib.contextmanager
def named(name: str) -> Iterator[None]:
    """The calling thread named `name` for the block, its name before restored after:
    threads started inside the block (an engine's pools) keep `name`."""
    before = current()
    set_current(name)
    try:
        yield
    finally:
        if before is not None:
            set_current(before)
