"""Waiting in tests for what a server does in its own time."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any


def wait_until(condition: Callable[[], object], timeout_s: float, every_s: float = 0.02) -> None:
    """Ask `condition` every `every_s` until it holds; fail the test after `timeout_s`."""
    give_up_at = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < give_up_at, f"not within {timeout_s:g} s"
        time.sleep(every_s)


def raised_before_waiting(step: Coroutine[Any, Any, Any]) -> BaseException:
    """The exception coroutine `step` raises before it first waits for anything: what
    "refused at once" means, told apart without a clock (a busy machine can stretch any
    duration). An AssertionError if it returns or waits first (then it is closed)."""
    try:
        step.send(None)
    except StopIteration:
        raise AssertionError("it returned instead of raising") from None
    except Exception as raised:  # noqa: BLE001 - the caller asserts which
        return raised
    step.close()
    raise AssertionError("it waited before raising")
