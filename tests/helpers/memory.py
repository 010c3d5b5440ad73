"""How much memory a server process holds, from /proc (Linux)."""

from __future__ import annotations

import resource
from pathlib import Path


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the peak resident size) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid: int) -> None:
    """Set the process's VmHWM back to its resident size now (Linux's clear_refs 5), so
    that the next reading is the peak from here."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def descriptors_for(connections: int, spare: int = 64) -> int:
    """Raise this process's open-file limit (up to its hard limit) so that it can hold
    `connections` sockets beside `spare` other descriptors; how many it can hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + spare
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return min(connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - spare)
