"""Handing memory back to the system after large requests (glibc's allocator).

A 36-megapixel upload needs a few hundred MB for a moment: the decoded image, its
resize, the mask at full size. glibc serves such blocks from per-thread arenas and, once
they are freed, keeps much of them mapped, so a server that decoded a few large photos
stays gigabytes above idle (measured: +0.8 GB after a battery of 36 Mpx photos). Two
remedies, both no-ops where the C library is not glibc:

- `configure_allocator()` fixes the mmap threshold at 1 MiB, so every large block is
  its own mapping and goes back to the kernel on free (glibc otherwise raises the
  threshold after each free of a large block, up to 32 MiB, and serves later ones from
  the arenas);
- `MemoryReleaser` calls `malloc_trim(0)` (which returns free pages from every arena)
  in a worker thread shortly after a request that handled a large image.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger("hornet.service")

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
# Images above this many pixels trigger a trim once their request is done.
LARGE_IMAGE_PIXELS = 4_000_000


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    return libc


_LIBC = _libc()


def configure_allocator() -> bool:
    """Fix glibc's mmap threshold (module doc); True where it applied."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim() -> None:
    """Give free heap memory of every arena back to the kernel (glibc malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class MemoryReleaser:
    """Trims after large work: `note_large_work()`, from any thread, starts (or extends)
    a window of `linger_s` during which `run()` (a task on the event loop) trims in a
    worker thread every `interval_s`, so memory freed when the request's answer is built
    is handed back too. Idle servers never trim."""

    def __init__(self, interval_s: float = 0.5, linger_s: float = 20.0) -> None:
        self.interval_s = interval_s
        self.linger_s = linger_s
        self._until = 0.0

    def note_large_work(self) -> None:
        self._until = time.monotonic() + self.linger_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if time.monotonic() < self._until:
                await asyncio.to_thread(trim)
