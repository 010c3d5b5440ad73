"""`hornet serve --check`, a deployment's preflight: every model loaded, verified and
warmed as the server would, printed as /v1/models lists it with the process's memory, and
an exit status without ever listening (0 it would serve, 1 a model did not load, 2
settings or bundles refused)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from service.testing import free_port, running_server


def check(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", "--check", *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_servable_configuration_prints_each_model_as_the_server_lists_it(
    classifier_dir, segmenter_dir, tmp_path
) -> None:
    flags = ["--model-dir", str(classifier_dir), "--model-dir", str(segmenter_dir),
             "--engine-threads", "1", "--model-setting", "tiny_seg:instances=2"]  # fmt: skip
    port = free_port()
    done = check(*flags, "--port", str(port))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    checked = {line["model"]["name"]: line["model"] for line in lines[:-1]}
    memory = lines[-1]["memory_mib"]
    assert memory["peak"] >= memory["resident"] > 0
    with running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s:
        served = {m["name"]: m for m in httpx.get(f"{s.url}/v1/models").json()["models"]}
    assert checked == served  # the same engines, batching and instances as a real server's
    assert checked["tiny_seg"]["batching"]["instances"] == 2


def test_a_model_that_cannot_load_fails_the_check_with_its_reason(classifier_dir) -> None:
    done = check("--model-dir", str(classifier_dir), "--engine", "tensorrt")
    assert done.returncode == 1
    assert "hornet serve --check: model loading failed: EngineUnavailable" in done.stderr
    assert done.stdout == ""


def test_refused_settings_fail_the_check_before_loading(classifier_dir) -> None:
    done = check("--model-dir", str(classifier_dir), "--model-setting", "nope:instances=2")
    assert done.returncode == 2
    assert "--model-setting names 'nope', not served here" in done.stderr
