"""The machine a bundle is verified or served on, as parity records name it.

A record of a precision whose figures depend on the CPU's arithmetic (bf16 through
OpenVINO, an int8 graph) says in its `runtime` what ran it and on which CPU:
`"<engine> on <cpu_model()>"`. The exporter writes it; the service compares it with the
CPU it serves on.
"""

from __future__ import annotations

import platform
from pathlib import Path

RUNTIME_ON = " on "


def cpu_model() -> str:
    """This CPU's model name (/proc/cpuinfo's `model name`, else what Python's platform
    module says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_on(engine: str) -> str:
    """A parity record's `runtime`: the engine that ran it, on this CPU."""
    return f"{engine}{RUNTIME_ON}{cpu_model()}"


def runtime_cpu(runtime: str | None) -> str | None:
    """The CPU a record's `runtime` names (what `runtime_on` wrote), or None."""
    if not runtime or RUNTIME_ON not in runtime:
        return None
    return runtime.rpartition(RUNTIME_ON)[2] or None
