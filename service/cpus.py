"""How many CPUs this process may use: in a container, not the node's count.

`os.cpu_count()` is the machine's: a pod limited to 4 CPUs on a 64-core node would start
64 decoding threads (each holding up to one decoded image: memory) and engines sized for
64 cores (throttled by the quota). The CPUs a process may use are its affinity mask
(cpusets, `taskset`) capped by its cgroup's CPU quota (a container's CPU limit), rounded
up: cgroup v2 `cpu.max` ("400000 100000" is 4 CPUs, "max 100000" none), cgroup v1
`cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none), in the process's own cgroup and
every cgroup above it up to the mount (a container sees its own cgroup at the mount).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """The CPUs this process may use (module doc); at least 1.

    `proc_cgroup`: the text of /proc/self/cgroup (read when None)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: str | None = None
) -> float | None:
    """The smallest CPU quota (in CPUs) over this process's cgroups, None if none is set."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    quotas = [q for d in _cgroup_dirs(cgroup_root, proc_cgroup) if (q := _quota(d)) is not None]
    return min(quotas, default=None)


def _cgroup_dirs(root: Path, proc_cgroup: str) -> list[Path]:
    """The directories that may hold this process's CPU limits: v2's unified hierarchy at
    `root`, v1's cpu controller at root/cpu or root/cpu,cpuacct; in each, the process's
    own cgroup and every one above it."""
    dirs: list[Path] = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            mounts = [root]
        elif "cpu" in controllers.split(","):
            mounts = [root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"]
        else:
            continue
        parts = [part for part in path.split("/") if part and part != ".."]
        for mount in mounts:
            for depth in range(len(parts), -1, -1):
                dirs.append(mount.joinpath(*parts[:depth]))
    if not dirs:
        dirs = [root, root / "cpu", root / "cpu,cpuacct"]
    return list(dict.fromkeys(dirs))


def _quota(directory: Path) -> float | None:
    try:
        quota, _, period = (directory / "cpu.max").read_text().partition(" ")
        if quota.strip() == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us
