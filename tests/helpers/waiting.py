"""Waiting in tests for what a server does in its own time."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout_s: float, every_s: float = 0.02) -> None:
    """Ask `condition` every `every_s` until it holds; fail the test after `timeout_s`."""
    give_up_at = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up_at, f"not within {timeout_s:g} s"
        time.sleep(every_s)
