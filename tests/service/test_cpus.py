"""The CPUs the server sizes itself by (service.cpus): a container's CPU limit and the
process's affinity, not the machine's count; checked on fake cgroup trees laid out as
the kernel does, and on real processes started with a narrower affinity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.cpus import available_cpus, cgroup_cpu_quota
from service.testing import running_server
from tests.helpers.images import encode, upload

AFFINITY = len(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(AFFINITY < 2, reason="needs a machine with 2 CPUs or more")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_quota_at_the_containers_root(tmp_path) -> None:
    _write(tmp_path / "cpu.max", "150000 100000")  # a pod's limit of 1.5 CPUs
    assert cgroup_cpu_quota(tmp_path, "0::/\n") == 1.5
    assert available_cpus(tmp_path, "0::/\n") == min(AFFINITY, 2)  # rounded up


def test_cgroup_v2_without_a_limit(tmp_path) -> None:
    _write(tmp_path / "cpu.max", "max 100000")
    assert cgroup_cpu_quota(tmp_path, "0::/\n") is None
    assert available_cpus(tmp_path, "0::/\n") == AFFINITY


def test_cgroup_v2_the_smallest_limit_on_the_way_up(tmp_path) -> None:
    """A process in a nested cgroup (no cgroup namespace): its own and every parent's
    limit apply."""
    _write(tmp_path / "cpu.max", "max 100000")
    _write(tmp_path / "kubepods.slice" / "cpu.max", "800000 100000")
    _write(tmp_path / "kubepods.slice" / "pod1" / "cpu.max", "100000 100000")
    _write(tmp_path / "kubepods.slice" / "pod1" / "c1" / "cpu.max", "max 100000")
    proc = "0::/kubepods.slice/pod1/c1\n"
    assert cgroup_cpu_quota(tmp_path, proc) == 1.0
    assert available_cpus(tmp_path, proc) == 1


def test_cgroup_v1_cfs_quota(tmp_path) -> None:
    cgroup = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    _write(cgroup / "cpu.cfs_quota_us", "50000")
    _write(cgroup / "cpu.cfs_period_us", "100000")
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1")
    _write(tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us", "100000")
    proc = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_cpu_quota(tmp_path, proc) == 0.5
    assert available_cpus(tmp_path, proc) == 1  # never under one


def test_no_cgroup_files_means_no_quota(tmp_path) -> None:
    assert cgroup_cpu_quota(tmp_path, "0::/\n") is None
    assert cgroup_cpu_quota(tmp_path, "") is None
    assert available_cpus(tmp_path, "") == AFFINITY


@needs_two_cpus
def test_settings_follow_the_affinity() -> None:
    """Started on one CPU (as `taskset -c 0` would), the defaults size themselves by it:
    one decoding thread, its image cache, one engine thread (ONNX Runtime would
    otherwise size its pool from the machine)."""
    code = (
        "from service.settings import Settings; s = Settings(); "
        "print(s.decode_workers, s.engine_thread_count, s.image_cache_size_mib)"
    )
    one_cpu = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert one_cpu == ["1", "1", "96"]
    every_cpu = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    # where the process may use the whole machine, the runtime keeps its own default (0)
    expected_engine = "0" if AFFINITY == os.cpu_count() else str(AFFINITY)
    assert every_cpu == [str(AFFINITY), expected_engine, str(96 * AFFINITY)]


@needs_two_cpus
def test_a_server_on_one_cpu_sizes_itself_by_it(classifier_dir, tmp_path, photos) -> None:
    """The server's own account of its sizing (its "resources" log line), started on one
    CPU, and it answers as usual."""
    log_path = tmp_path / "server.log"
    flags = ["--model-dir", str(classifier_dir)]
    with running_server(flags, log_path=log_path, cpus={0}) as (url, process, _):
        answer = httpx.post(f"{url}/classify", files=upload(encode(photos["coffee"])), timeout=60)
        assert answer.status_code == 200, answer.text[:300]
        assert os.sched_getaffinity(process.pid) == {0}
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line[:1] == "{"]
    (resources,) = [line for line in lines if line.get("message") == "resources"]
    assert resources["cpus"] == 1
    assert resources["decode_threads"] == 1
    assert resources["engine_threads"] == 1
    assert resources["image_cache_mib"] == 96
