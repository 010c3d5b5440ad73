"""Trace ids in the logs: a request that comes with a W3C `traceparent` (over REST as a
header, over gRPC in the call's metadata) has its log lines carry the trace id, so that
they can be found from a trace; a malformed one is ignored, as the specification asks.
The examples are the W3C Trace Context specification's."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.logs import parse_traceparent
from service.testing import LOOPBACK, free_port, running_server
from tests.helpers.images import encode, upload

SPEC_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPEC_PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{SPEC_TRACE}-{SPEC_PARENT}-01"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT, SPEC_TRACE),
        (f"00-{SPEC_TRACE}-{SPEC_PARENT}-00", SPEC_TRACE),  # not sampled: still a trace
        (f"cc-{SPEC_TRACE}-{SPEC_PARENT}-01-what-the-future-adds", SPEC_TRACE),
        (f"00-{SPEC_TRACE}-{SPEC_PARENT}-01-extra", None),  # version 00 has four fields
        (f"ff-{SPEC_TRACE}-{SPEC_PARENT}-01", None),  # an invalid version
        (f"00-{'0' * 32}-{SPEC_PARENT}-01", None),  # an all-zero trace id
        (f"00-{SPEC_TRACE}-{'0' * 16}-01", None),  # an all-zero parent id
        (TRACEPARENT.upper(), None),  # hex is lowercase
        (f"00-{SPEC_TRACE[:-1]}-{SPEC_PARENT}-01", None),
        ("", None),
        (f"cc-{SPEC_TRACE}-{SPEC_PARENT}-01-{'x' * 600}", None),  # past any sane length
    ],
)
def test_a_traceparent_gives_its_trace_id_or_nothing(header: str, expected: str | None) -> None:
    parsed = parse_traceparent(header)
    assert (None if parsed is None else parsed.trace_id) == expected


def _lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_a_requests_log_lines_carry_its_trace_id_over_rest_and_grpc(
    classifier_dir, photos, tmp_path: Path
) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    log, port = tmp_path / "server.log", free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1", "--grpc-port", str(port)]
    image = encode(photos["chelsea"], "JPEG", quality=90)
    with running_server(flags, log_path=log, inherit_settings=False) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            traced = http.post(
                "/classify", files=upload(image),
                headers={"traceparent": TRACEPARENT, "x-request-id": "traced-rest"},
            )  # fmt: skip
            plain = http.post("/classify", files=upload(image), headers={"x-request-id": "plain"})
            bad = http.post(
                "/classify", files=upload(image),
                headers={"traceparent": "00-zz-00-01", "x-request-id": "malformed"},
            )  # fmt: skip
            refused = http.post(
                "/classify", params={"model": "nope"}, files=upload(image),
                headers={"traceparent": TRACEPARENT, "x-request-id": "traced-404"},
            )  # fmt: skip
        with grpcclient.InferenceServerClient(f"{LOOPBACK}:{port}") as client:
            pixels = grpcclient.InferInput("image", [1, 224, 224, 3], "UINT8")
            pixels.set_data_from_numpy(np.zeros((1, 224, 224, 3), dtype=np.uint8))
            headers = {"traceparent": TRACEPARENT, "x-request-id": "traced-grpc"}
            client.infer("tiny_cls", [pixels], headers=headers)
    assert [r.status_code for r in (traced, plain, bad, refused)] == [200, 200, 200, 404]
    by_request: dict[str, list[dict]] = {}
    for line in _lines(log):
        by_request.setdefault(line.get("request_id"), []).append(line)
    for rid in ("traced-rest", "traced-404", "traced-grpc"):
        access = [line for line in by_request[rid] if line["logger"] == "hornet.access"]
        assert access and all(line.get("trace_id") == SPEC_TRACE for line in access), rid
    for rid in ("plain", "malformed"):
        assert by_request[rid] and all("trace_id" not in line for line in by_request[rid])
    # no trace id outlives its request: the lines of no request carry none
    assert all("trace_id" not in line for line in by_request.get(None, []))
