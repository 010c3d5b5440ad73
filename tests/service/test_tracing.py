"""OpenTelemetry traces of inference requests (--trace-endpoint), checked at a collector's
receiving end: a real server exports with OpenTelemetry's SDK over OTLP/HTTP to an OTLP
receiver in this test (tests/helpers/otlp.py), which decodes the spans with
OpenTelemetry's own message definitions. What is checked against what: a request's
trace and parent ids against the W3C traceparent it was sent with; its stages' spans
against the Server-Timing header the same request was answered with (two views of one
measurement, the header's already checked against the statistics and a timed engine in
test_server_timing.py); which requests are traced against Triton's trace_rate and
trace_count, set through tritonclient's own trace settings calls (REST and gRPC); the
request ids and trace ids in the server's log lines against the spans' attributes.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.testing import RunningServer, free_port, running_server
from service.tracing import decimal_pattern
from tests.helpers.images import encode
from tests.helpers.otlp import Collector, Span, running_collector
from tests.helpers.server_timing import parse_server_timing
from tests.helpers.waiting import wait_until

STAGES = ["compute_input", "queue", "compute_infer", "compute_output"]
SERVER_KIND, INTERNAL_KIND = 2, 1  # opentelemetry.proto.trace.v1.Span.SpanKind
IMAGE = encode(np.full((120, 160, 3), 100, np.uint8), "PNG")
GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with running_collector() as running:
        yield running


@pytest.fixture(scope="module")
def served(
    classifier_dir: Path, collector: Collector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("tracing") / "server.log"
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1"]
    flags += ["--grpc-port", str(GRPC_PORT), "--trace-endpoint", collector.url]
    flags += ["--trace-rate", "1000000", "--allow-trace-settings"]
    # spans leave in batches every 50 ms instead of OpenTelemetry's 5 s
    env = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "hornet-under-test"}
    with running_server(flags, log_path=log, env=env) as server:
        yield server


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace}-{parent}-{'01' if sampled else '00'}", trace, parent


def _classify(url: str, headers: dict[str, str] | None = None, body: bytes = IMAGE):
    return httpx.post(
        f"{url}/classify", content=body, headers={"content-type": "image/png", **(headers or {})}
    )


def _spans_of(collector: Collector, trace: str, count: int) -> list[Span]:
    wait_until(lambda: len(collector.trace(trace)) >= count, timeout_s=20)
    time.sleep(0.2)  # none more come
    return collector.trace(trace)


def _check_request_trace(spans: list[Span], parent: str, name: str) -> tuple[Span, list[Span]]:
    """The server span (under `parent`) and its four stage spans, in order, within it."""
    (root,) = [span for span in spans if span.parent_span_id == parent]
    assert root.name == name and root.kind == SERVER_KIND
    children = sorted((s for s in spans if s is not root), key=lambda span: span.start_ns)
    assert [child.name for child in children] == STAGES
    for child in children:
        assert child.parent_span_id == root.span_id and child.kind == INTERNAL_KIND
        assert root.start_ns <= child.start_ns <= child.end_ns <= root.end_ns
    for before, after in zip(children, children[1:], strict=False):
        assert before.end_ns <= after.start_ns + 1000  # one after the other (to the us)
    assert root.resource["service.name"] == "hornet-under-test"
    return root, children


def test_a_request_sampled_by_its_caller_gets_the_servers_spans(
    served: RunningServer, collector: Collector
) -> None:
    header, trace, parent = _traceparent()
    rid = f"traced-{secrets.token_hex(4)}"
    answer = _classify(served.url, {"traceparent": header, "x-request-id": rid})
    assert answer.status_code == 200, answer.text
    root, children = _check_request_trace(_spans_of(collector, trace, 5), parent, "POST /classify")
    assert root.attributes == {
        "hornet.model": "tiny_cls",
        "hornet.request_id": rid,
        "hornet.images": 1,
        "http.request.method": "POST",
        "http.route": "/classify",
        "url.path": "/classify",
        "http.response.status_code": 200,
    }
    assert root.status_code == 0  # unset: no error
    timing = parse_server_timing(answer.headers["server-timing"])
    for child in children:  # the same measurement as the header's (3 decimals of a ms)
        assert abs((child.end_ns - child.start_ns) / 1e6 - timing[child.name]) <= 0.002
    # the request's log lines carry the trace id
    lines = [json.loads(line) for line in served.log_path.read_text().splitlines()]
    mine = [line for line in lines if line.get("request_id") == rid]
    assert mine and all(line.get("trace_id") == trace for line in mine)


def test_a_request_its_caller_did_not_sample_is_not_traced(
    served: RunningServer, collector: Collector
) -> None:
    unsampled, unsampled_trace, _ = _traceparent(sampled=False)
    assert _classify(served.url, {"traceparent": unsampled}).status_code == 200
    header, trace, parent = _traceparent()  # exported after it, were it exported
    assert _classify(served.url, {"traceparent": header}).status_code == 200
    _spans_of(collector, trace, 5)
    assert collector.trace(unsampled_trace) == []


def test_v2_rest_and_grpc_requests_are_traced(served: RunningServer, collector: Collector) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    header, trace, parent = _traceparent()
    with httpclient.InferenceServerClient(served.url.removeprefix("http://")) as client:
        image = httpclient.InferInput("encoded_image", [1], "BYTES")
        image.set_data_from_numpy(np.array([IMAGE], dtype=np.object_), binary_data=True)
        client.infer("tiny_cls", [image], headers={"traceparent": header})
    root, _ = _check_request_trace(
        _spans_of(collector, trace, 5), parent, "POST /v2/models/{model}/infer"
    )
    assert root.attributes["url.path"] == "/v2/models/tiny_cls/infer"

    header, trace, parent = _traceparent()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}") as client:
        image = grpcclient.InferInput("encoded_image", [1], "BYTES")
        image.set_data_from_numpy(np.array([IMAGE], dtype=np.object_))
        client.infer("tiny_cls", [image], headers={"traceparent": header})
    root, _ = _check_request_trace(
        _spans_of(collector, trace, 5), parent, "inference.GRPCInferenceService/ModelInfer"
    )
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.method"] == "ModelInfer"
    assert root.attributes["hornet.model"] == "tiny_cls"


def test_each_request_on_a_grpc_stream_is_a_span_of_its_own(
    served: RunningServer, collector: Collector
) -> None:
    """A stream's traceparent (its call's metadata) is the parent of every request sent
    on it: one server span each."""
    import queue

    import tritonclient.grpc as grpcclient

    header, trace, parent = _traceparent()
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}") as client:
        client.start_stream(
            callback=lambda result, error: answers.put(error), headers={"traceparent": header}
        )
        image = grpcclient.InferInput("encoded_image", [1], "BYTES")
        image.set_data_from_numpy(np.array([IMAGE], dtype=np.object_))
        for index in range(2):
            client.async_stream_infer("tiny_cls", [image], request_id=f"stream-{index}")
            assert answers.get(timeout=30) is None
        client.stop_stream()
    spans = _spans_of(collector, trace, 10)
    roots = [span for span in spans if span.parent_span_id == parent]
    assert [root.name for root in roots] == ["inference.GRPCInferenceService/ModelStreamInfer"] * 2
    for root in roots:
        children = [span for span in spans if span.parent_span_id == root.span_id]
        assert sorted(child.name for child in children) == sorted(STAGES)


def test_a_refused_request_is_traced_with_its_error(
    served: RunningServer, collector: Collector
) -> None:
    header, trace, parent = _traceparent()
    answer = _classify(served.url, {"traceparent": header}, body=IMAGE[: len(IMAGE) // 2])
    assert answer.status_code == 400, answer.text
    spans = _spans_of(collector, trace, 2)
    (root,) = [span for span in spans if span.parent_span_id == parent]
    assert root.attributes["http.response.status_code"] == 400
    assert root.attributes["error.type"] == answer.json()["error"]
    assert root.status_code == 0  # a client's mistake is not the server's error
    assert [span.name for span in spans if span is not root] == ["compute_input"]


def test_trace_rate_and_count_through_tritonclient(
    served: RunningServer, collector: Collector
) -> None:
    """One request in trace_rate of those without a traceparent starts a trace of its own
    (the first, then every trace_rate-th), until trace_count traces are spent."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(served.url.removeprefix("http://")) as client:
        settings = client.update_trace_settings(settings={"trace_rate": "2", "trace_count": "3"})
        assert settings["trace_rate"] == "2" and settings["trace_count"] == "3"
        assert settings["trace_level"] == ["TIMESTAMPS"]
        assert settings["trace_mode"] == "opentelemetry"
        before = {span.trace_id for span in collector.spans()}
        rids = [f"rate-{index}-{secrets.token_hex(3)}" for index in range(8)]
        for rid in rids:
            assert _classify(served.url, {"x-request-id": rid}).status_code == 200
        assert client.get_trace_settings()["trace_count"] == "0"
        wait_until(
            lambda: (
                sum(
                    span.name == "POST /classify" and span.trace_id not in before
                    for span in collector.spans()
                )
                >= 3
            ),
            timeout_s=20,
        )
        time.sleep(0.3)
        roots = [
            span
            for span in collector.spans()
            if span.name == "POST /classify" and span.trace_id not in before
        ]
        assert [root.attributes["hornet.request_id"] for root in roots] == [
            rids[0],
            rids[2],
            rids[4],
        ]
        assert all(root.parent_span_id == "" for root in roots)  # traces of their own
        assert len({root.trace_id for root in roots}) == 3
        # a trace the server started: the request's log lines carry its id
        lines = [json.loads(line) for line in served.log_path.read_text().splitlines()]
        for root in roots:
            mine = [
                line
                for line in lines
                if line.get("request_id") == root.attributes["hornet.request_id"]
            ]
            assert mine and all(line.get("trace_id") == root.trace_id for line in mine)
        # null restores the value the server started with
        restored = client.update_trace_settings(settings={"trace_rate": None, "trace_count": None})
        assert restored["trace_rate"] == "1000000" and restored["trace_count"] == "-1"


def test_a_models_own_settings_over_grpc_and_rest(
    served: RunningServer, collector: Collector
) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    with grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}") as client:
        own = client.update_trace_settings(
            model_name="tiny_cls", settings={"trace_level": ["OFF"]}, as_json=True
        )
        assert own["settings"]["trace_level"]["value"] == ["OFF"]
        server = client.get_trace_settings(as_json=True)["settings"]
        assert server["trace_level"]["value"] == ["TIMESTAMPS"]
    with httpclient.InferenceServerClient(served.url.removeprefix("http://")) as client:
        assert client.get_trace_settings(model_name="tiny_cls")["trace_level"] == ["OFF"]
        off, off_trace, _ = _traceparent()
        assert _classify(served.url, {"traceparent": off}).status_code == 200
        cleared = client.update_trace_settings(
            model_name="tiny_cls", settings={"trace_level": None}
        )
        assert cleared["trace_level"] == ["TIMESTAMPS"]  # the server's again
    header, trace, _ = _traceparent()
    assert _classify(served.url, {"traceparent": header}).status_code == 200
    _spans_of(collector, trace, 5)
    assert collector.trace(off_trace) == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"trace_rate": "0"}, "trace_rate"),
        ({"trace_count": "-2"}, "trace_count"),
        # what int() takes or isdigit() calls a digit: neither is a decimal setting
        ({"trace_count": "--5"}, "trace_count"),
        ({"trace_rate": "\u00b2"}, "trace_rate"),  # superscript two
        ({"trace_rate": "\u0661\u0662"}, "trace_rate"),  # Arabic-Indic twelve
        ({"trace_rate": " 7"}, "trace_rate"),
        ({"trace_rate": "007"}, "trace_rate"),
        ({"trace_rate": "2147483648"}, "trace_rate"),
        ({"trace_level": ["TENSORS"]}, "trace_level"),
        ({"trace_level": 1}, "trace_level"),
        ({"trace_file": "/tmp/trace.json"}, "trace_file"),
        ({"sample_everything": "1"}, "sample_everything"),
        ([], "JSON object"),
    ],
)
def test_a_bad_trace_setting_is_refused_and_none_applied(
    served: RunningServer, body: object, named: str
) -> None:
    before = httpx.get(f"{served.url}/v2/trace/setting").json()
    change = {"trace_rate": "7", **body} if isinstance(body, dict) else body
    answer = httpx.post(f"{served.url}/v2/trace/setting", json=change)
    assert answer.status_code == 422 and named in answer.json()["error"]
    assert httpx.get(f"{served.url}/v2/trace/setting").json() == before


def test_an_unknown_models_trace_settings_are_404(served: RunningServer) -> None:
    answer = httpx.get(f"{served.url}/v2/models/nope/trace/setting")
    assert answer.status_code == 404 and answer.json()["error"].startswith("unknown_model")


def test_the_trace_extension_is_advertised(served: RunningServer) -> None:
    assert "trace" in httpx.get(f"{served.url}/v2").json()["extensions"]


def test_without_an_endpoint_nothing_is_traced_and_settings_are_read_only(
    classifier_dir: Path,
) -> None:
    with running_server(["--model-dir", str(classifier_dir), "--engine-threads", "1"]) as server:
        settings = httpx.get(f"{server.url}/v2/trace/setting").json()
        assert settings["trace_level"] == ["OFF"]
        refused = httpx.post(f"{server.url}/v2/trace/setting", json={"trace_rate": "1"})
        assert refused.status_code == 403
        assert refused.json()["error"].startswith("trace_settings_off")
        assert httpx.post(f"{server.url}/v2/trace/setting", json={}).json() == settings


def test_a_collector_that_is_down_costs_the_requests_nothing(
    classifier_dir: Path, tmp_path: Path
) -> None:
    """Spans for a collector that refuses every connection: requests answered as ever,
    the failed batches logged as JSON lines (one each, not one per retry), and the server
    stops without waiting out the exporter's retries."""
    down = f"http://127.0.0.1:{free_port()}/v1/traces"
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1"]
    flags += ["--trace-endpoint", down, "--trace-rate", "1", "--drain-timeout-s", "1"]
    # each batch given up after 1 s of retries (OpenTelemetry's default: 10 s)
    env = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1"}
    with running_server(flags, env=env, log_path=tmp_path / "server.log") as server:
        for _ in range(20):
            assert _classify(server.url).status_code == 200
        log = server.log_path
        wait_until(lambda: '"logger": "opentelemetry' in log.read_text(), timeout_s=10)
        assert _classify(server.url).status_code == 200
        stopping = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=30)
        assert server.process.returncode == 0
        assert time.monotonic() - stopping < 9  # drain 1 s + the exporter's 5 s at most
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    exporter = [line for line in lines if line["logger"].startswith("opentelemetry")]
    assert exporter and all(line["level"] == "error" for line in exporter)


def test_changing_the_settings_takes_a_key_where_keys_are_set(
    classifier_dir: Path, collector: Collector, tmp_path: Path
) -> None:
    key = "trace-settings-key-91c2"
    flags = ["--model-dir", str(classifier_dir), "--trace-endpoint", collector.url]
    flags += ["--allow-trace-settings"]
    log = tmp_path / "keys.log"
    env = {"HORNET_API_KEYS": key}
    with running_server(flags, env=env, log_path=log, ready_headers={"x-api-key": key}) as server:
        url = f"{server.url}/v2/trace/setting"
        assert httpx.post(url, json={"trace_rate": "1"}).status_code == 401
        assert httpx.get(url).status_code == 401
        changed = httpx.post(url, json={"trace_rate": "3"}, headers={"x-api-key": key})
        assert changed.status_code == 200 and changed.json()["trace_rate"] == "3"
    assert key not in log.read_text()
    with running_server(flags, log_path=tmp_path / "open.log", inherit_settings=False):
        pass
    warned = [
        json.loads(line)["message"]
        for line in (tmp_path / "open.log").read_text().splitlines()
        if json.loads(line)["level"] == "warning"
    ]
    assert any(m.startswith("--allow-trace-settings without API keys") for m in warned)


@pytest.mark.parametrize("maximum", [1, 9, 10, 99, 100, 101, 2147, 9990, 10000, 30509])
def test_decimal_pattern_takes_exactly_one_to_its_maximum(maximum: int) -> None:
    """Against every number written out: str(n) for 1..maximum is taken, and nothing else
    of up to one digit more (0, maximum + 1.., leading zeros, signs)."""
    pattern = re.compile(f"^(?:{decimal_pattern(maximum)})$")
    written = {str(n) for n in range(1, maximum + 1)}
    candidates = (
        {str(n) for n in range(0, 10 * maximum + 10)}
        | {"0" + text for text in written}
        | {"-" + text for text in written}
        | {"+1", "", " 1", "1 "}
    )
    taken = {text for text in candidates if pattern.fullmatch(text)}
    assert taken == written


def test_trace_settings_take_the_largest_value_and_say_the_range(served: RunningServer) -> None:
    url = f"{served.url}/v2/trace/setting"
    before = httpx.get(url).json()
    try:
        changed = httpx.post(url, json={"trace_rate": str(2**31 - 1), "trace_count": "0"})
        assert changed.status_code == 200, changed.text
        assert changed.json()["trace_rate"] == "2147483647"
        refused = httpx.post(url, json={"trace_count": "2147483648"})
        assert refused.status_code == 422
        assert "from -1 to 2147483647 in decimal digits" in refused.json()["error"]
    finally:
        httpx.post(url, json={name: before[name] for name in ("trace_rate", "trace_count")})
    assert httpx.get(url).json() == before
