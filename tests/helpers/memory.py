"""How much memory a server process holds, from /proc (Linux)."""

from __future__ import annotations

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
