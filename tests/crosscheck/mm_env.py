"""Where the test-only OpenMMLab environment is (made by `make mm-env`,
tools/make_mm_env.sh; docs/cross-checks.md) and how to run a script in it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MM_VENV = Path(os.environ.get("HORNET_MM_VENV", REPO / ".venv-mm"))
MM_PYTHON = MM_VENV / "bin" / "python"


def mm_python() -> Path:
    """The environment's interpreter; a missing environment is an error, never a skip."""
    if not (MM_VENV / ".installed").is_file():
        raise FileNotFoundError(
            f"the OpenMMLab environment {MM_VENV} is missing or incomplete: run `make mm-env` "
            "(tools/make_mm_env.sh); `make test` makes it first"
        )
    return MM_PYTHON


def site_packages() -> Path:
    """The environment's site-packages folder (to read an installed package's files)."""
    mm_python()
    (folder,) = MM_VENV.glob("lib/python3*/site-packages")
    return folder


def run_in_mm_env(script: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `script` with the environment's Python; its output is in the error if it fails."""
    result = subprocess.run(
        [str(mm_python()), str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "2"},
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{script.name} failed in {MM_VENV} (exit {result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result
