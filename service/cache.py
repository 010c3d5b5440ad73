"""The response cache (`--response-cache-mib`, off by default): a model's engine results
for an encoded image it has answered before, found by the SHA-256 of the image's bytes as
uploaded, so that the same file sent again skips its decoding, preprocessing and engine
run. The answer is still shaped for each request (its top-k, score threshold, mask
format), from the cached results, exactly as from fresh ones.

Bounded: entries are counted by the bytes of their arrays (copied out of the batch's
outputs, and read-only, so no answer can change them), the least recently used dropped
first, and an entry over an eighth of the capacity (a large segmentation map's tiles) is
not kept. Looked up from the decoding threads and filled from the event loop, under a
lock. Only encoded images are cached (uploads to the image routes, v2 `encoded_image`);
v2 tensors of pixels are not.

The same bytes get the same answer whoever sent them, so a hit tells a client that the
file was sent before (as any response cache does: Triton's too): keep it off where
clients must not learn that of each other.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

# What an entry costs beside its arrays (the key, the dict slot, the objects).
ENTRY_OVERHEAD_BYTES = 512


@dataclass(frozen=True)
class Cached:
    """An image's geometry and finishing context (its Prepared without items) and its
    engine results."""

    width: int
    height: int
    context: Any
    results: list[Any]


def digest(data: bytes) -> bytes:
    """The cache key of an upload: the SHA-256 of its bytes (hashlib releases the
    interpreter lock for large inputs, so decoding threads hash side by side)."""
    return hashlib.sha256(data).digest()


class ResponseCache:
    """Cached results by image digest, at most `capacity` bytes of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self._entries: OrderedDict[bytes, tuple[Cached, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Cached | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: bytes, width: int, height: int, context: Any, results: list[Any]) -> bool:
        """Keep the results (copied, read-only); False when they are too large to keep."""
        size = _nbytes(results) + ENTRY_OVERHEAD_BYTES
        if size > self.capacity // 8:
            return False  # before copying anything
        kept = _frozen(results)
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.size -= previous[1]
            self._entries[key] = (Cached(width, height, context, kept), size)
            self.size += size
            while self.size > self.capacity:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.size -= dropped
        return True

    def __len__(self) -> int:
        return len(self._entries)


def _frozen(value: Any) -> Any:
    """`value` with every array copied (not a view into a batch's outputs, which would
    keep the whole batch alive) and made read-only."""
    if isinstance(value, np.ndarray):
        copy = np.array(value, copy=True)
        copy.flags.writeable = False
        return copy
    if isinstance(value, list):
        return [_frozen(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return {key: _frozen(item) for key, item in value.items()}
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, list | tuple):
        return sum(_nbytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_nbytes(item) for item in value.values())
    return 64
