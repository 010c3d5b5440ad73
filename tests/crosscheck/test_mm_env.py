"""The OpenMMLab environment holds the versions .ci/constraints-mm.txt pins (the
cross-checks compare against that exact code; tools/make_mm_env.sh installs with the
file as pip constraints, so a release of any package it pulls in cannot change them)."""

from __future__ import annotations

import re
import subprocess

from tests.crosscheck.mm_env import REPO, mm_python

CONSTRAINTS = REPO / ".ci" / "constraints-mm.txt"


def _versions(lines: list[str]) -> dict[str, str]:
    pins = (line.split("==") for line in lines if line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def test_mm_env_holds_the_pinned_versions() -> None:
    pinned = _versions(CONSTRAINTS.read_text().splitlines())
    assert {"mmcv", "mmsegmentation", "mmdet", "torch", "timm", "numpy"} <= set(pinned)
    frozen = subprocess.run(
        [str(mm_python()), "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    installed = _versions(frozen)
    differ = {n: (v, installed.get(n)) for n, v in pinned.items() if installed.get(n) != v}
    assert not differ, f"pinned vs installed (run make mm-env): {differ}"
