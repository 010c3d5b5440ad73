"""The OpenMMLab environment holds the versions .ci/constraints-mm.txt pins (the
cross-checks compare against that exact code; tools/make_mm_env.sh installs with the
file as pip constraints, so a release of any package it pulls in cannot change them)."""

from __future__ import annotations

import subprocess

from tests.crosscheck.mm_env import REPO, mm_python
from tests.helpers.pins import mismatches, pinned_versions

CONSTRAINTS = REPO / ".ci" / "constraints-mm.txt"


def test_mm_env_holds_the_pinned_versions() -> None:
    pinned = pinned_versions(CONSTRAINTS.read_text().splitlines())
    assert {"mmcv", "mmsegmentation", "mmdet", "torch", "timm", "numpy"} <= set(pinned)
    frozen = subprocess.run(
        [str(mm_python()), "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    differ = mismatches(pinned, pinned_versions(frozen))
    assert not differ, f"pinned vs installed (run make mm-env): {differ}"
