"""bench/loadgen.py's `memory_mib`, with which bench/peers.py compares the servers' memory:
the PSS of a process tree, so a page that a forked worker shares with its parent counts
once, where a sum of the processes' RSS (the kernel's own VmRSS) would count it twice."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.bench import bench_module

ARRAY_MIB = 96

# Fills an array, forks, and leaves both processes holding its pages (the child never
# writes to it, so they stay shared), then prints the child's pid and waits.
HOLDER = textwrap.dedent(
    f"""
    import os, sys, time
    import numpy as np
    block = np.ones({ARRAY_MIB} * 2**20 // 8)
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    sys.stdin.readline()
    os.kill(child, 9)
    """
)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux 4.14+ only")
def test_a_page_shared_by_a_parent_and_its_forked_child_counts_once() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(holder.stdout.readline())
        pids = [holder.pid, child]
        with bench_module("loadgen") as loadgen:
            pss = loadgen.memory_mib(pids)
            alone = loadgen.memory_mib([holder.pid])
        rss = sum(_rss_mib(pid) for pid in pids)
    finally:
        holder.communicate("\n", timeout=30)
    # Both processes map the whole array: RSS counts it in each, PSS half in each.
    assert rss > 2 * ARRAY_MIB
    assert ARRAY_MIB < pss < rss - 0.8 * ARRAY_MIB, (pss, rss)
    assert ARRAY_MIB / 2 < alone < pss, (alone, pss)
