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

A fresh mapping costs a page fault and a zeroed page for every 4 KiB the image writes:
a 12-megapixel photo decoded in full spent about 60 ms of kernel time that way (2 vCPUs,
bench/README.md). So Pillow, which stores images in blocks of up to 16 MiB, is allowed to
keep a bounded number of freed blocks and hand them to the next image
(`configure_image_cache`: `Image.core.set_blocks_max`); `MemoryReleaser` empties that
cache as soon as a tick passes with no image made, so it holds memory only while images
keep coming, and never more than the size it was given.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time

from PIL import Image

log = logging.getLogger("hornet.service")

MIB = 1 << 20
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = MIB
# Images above this many pixels trigger a trim once their request is done.
LARGE_IMAGE_PIXELS = 4_000_000
# Pillow's image cache per decoding thread when not set: six of its blocks. A 12-megapixel
# RGB photo is three 16 MiB blocks decoded, its resize's first pass one more and the small
# images after it one each; the cache is a stack, so with fewer slots a small block comes
# back first and is grown to 16 MiB in fresh pages (measured: 3700 page faults a photo
# with four slots, 380 with five).
IMAGE_CACHE_MIB_PER_THREAD = 96


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


def configure_image_cache(mib: int) -> int:
    """Let Pillow keep up to `mib` MiB of freed image blocks for reuse (module doc); 0
    keeps none, Pillow's default. Returns the number of blocks (Pillow counts blocks of
    up to `Image.core.get_block_size()` bytes, 16 MiB; a larger freed block is shrunk)."""
    blocks = mib * MIB // Image.core.get_block_size()
    Image.core.set_blocks_max(blocks)
    return blocks


def release_image_cache() -> None:
    """Free the blocks Pillow's cache holds, then trim what that left in the arenas."""
    Image.core.clear_cache()
    trim()


class MemoryReleaser:
    """Trims after large work: `note_large_work()`, from any thread, starts (or extends)
    a window of `linger_s` during which `run()` (a task on the event loop) trims in a
    worker thread every `interval_s`, so memory freed when the request's answer is built
    is handed back too. And once an interval passes in which no image was made, it
    empties Pillow's block cache (`configure_image_cache`) if that holds any. Idle
    servers do neither."""

    def __init__(self, interval_s: float = 0.5, linger_s: float = 20.0) -> None:
        self.interval_s = interval_s
        self.linger_s = linger_s
        self._until = 0.0

    def note_large_work(self) -> None:
        self._until = time.monotonic() + self.linger_s

    async def run(self) -> None:
        made = Image.core.get_stats()["new_count"]
        while True:
            await asyncio.sleep(self.interval_s)
            stats = Image.core.get_stats()
            previous, made = made, stats["new_count"]
            if made == previous and stats["blocks_cached"]:
                await asyncio.to_thread(release_image_cache)
            elif time.monotonic() < self._until:
                await asyncio.to_thread(trim)
