"""A client's malformed body is said once in the log, by its request's access line (and
its 400), not by a library's own warning line beside it: python-multipart wrote one for
each malformed part, in plain text on standard error before the server's log took every
library's lines (service.logs.configure_logging), as a JSON warning line after."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from service.testing import running_server


def test_a_malformed_multipart_body_is_one_access_line(classifier_dir: Path, tmp_path) -> None:
    log = tmp_path / "server.log"
    boundary = "b0undary"
    # a quote inside a part's header name: python-multipart warns "Found invalid
    # character 34 in header" and stops
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n'
        f'X-"Quoted": 1\r\n\r\nnot an image\r\n--{boundary}--\r\n'
    ).encode()
    with running_server(["--model-dir", str(classifier_dir)], log_path=log) as server:
        for _ in range(3):
            answer = httpx.post(
                f"{server.url}/classify",
                content=body,
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                timeout=30,
            )
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"] == "bad_request"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    refused = [line for line in lines if line.get("path") == "/classify"]
    assert [line["status"] for line in refused] == [400, 400, 400]
    assert not [line for line in lines if line["logger"].startswith("python_multipart")]
