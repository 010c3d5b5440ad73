"""The access log: one line per request answered, on the `hornet.access` logger, a 5xx
among them as a warning (but a readiness probe's 503, "not ready"); `--no-access-log`
leaves out all but the warnings. Real
`python -m service` processes whose model cannot load (`--engine tensorrt` on a host
without it, kept up by --no-exit-on-load-error), so that /classify answers 503."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from service.testing import running_server
from tests.helpers.images import encode, upload


def access_lines(log_text: str) -> list[dict]:
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "hornet.access"]


@pytest.mark.parametrize("access_log", [True, False])
def test_the_access_log_and_what_no_access_log_keeps(classifier_dir, tmp_path, access_log):
    switch = "--access-log" if access_log else "--no-access-log"
    flags = ["--model-dir", str(classifier_dir), "--engine", "tensorrt",
             "--no-exit-on-load-error", switch]  # fmt: skip
    log_path = tmp_path / "server.log"
    image = encode(np.zeros((8, 8, 3), dtype=np.uint8))
    with running_server(
        flags, log_path=log_path, inherit_settings=False, ready_path="/healthz"
    ) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/v1/models").status_code == 200
            assert http.post("/classify", files=upload(image)).status_code == 503
            for probe in ("/readyz", "/v2/health/ready"):
                assert http.get(probe).status_code == 503  # not ready: an answer, no failure
    lines = access_lines(log_path.read_text())
    by_path = {(line["path"], line["status"]): line["level"] for line in lines}
    assert by_path.get(("/classify", 503)) == "warning", lines  # kept either way
    assert (("/v1/models", 200) in by_path) == access_log, lines
    for probe in ("/readyz", "/v2/health/ready"):
        assert by_path.get((probe, 503)) == ("info" if access_log else None), lines
