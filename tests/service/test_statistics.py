"""Triton's statistics extension (`GET /v2/models[/M]/stats`), read with tritonclient's HTTP
client from a real server: its counts against the requests the test sent and against the
same server's Prometheus counters, its durations against the client's own clock and
against each other."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.testing import running_server
from tests.helpers.images import encode, upload

httpclient = pytest.importorskip("tritonclient.http")

CLASSIFIER = "tiny_cls"
SEGMENTER = "tiny_seg"
MEMORY_CAP_BYTES = 4 << 30
TIMEOUT_S = 60
NS = 1_000_000_000


def stats_of(rest: httpclient.InferenceServerClient, model: str = "") -> dict[str, dict]:
    """tritonclient's statistics answer, by model name."""
    answer = rest.get_inference_statistics(model)
    return {entry["name"]: entry for entry in answer["model_stats"]}


def prometheus(http: httpx.Client, name: str, model: str, **labels: str) -> float:
    """The sum of a metric's samples for `model` and `labels` (every other label summed
    over)."""
    families = text_string_to_metric_families(http.get("/metrics").text)
    wanted = {"model": model, **labels}
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    )


@pytest.fixture(scope="module")
def server(classifier_dir, segmenter_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("statistics") / "server.log"
    flags = ["--model-dir", str(classifier_dir), "--model-dir", str(segmenter_dir),
             "--engine-threads", "1", "--max-batch-size", "4"]  # fmt: skip
    with (
        running_server(
            flags, log_path=log, inherit_settings=False, memory_limit_bytes=MEMORY_CAP_BYTES
        ) as running,
        httpx.Client(base_url=running.url, timeout=TIMEOUT_S) as http,
    ):
        rest = httpclient.InferenceServerClient(
            running.url.removeprefix("http://"), network_timeout=TIMEOUT_S
        )
        try:
            yield http, rest
        finally:
            rest.close()


def timed(call) -> tuple[httpx.Response, int]:
    """The response, and the client's wall time for it in nanoseconds."""
    started = time.perf_counter_ns()
    response = call()
    return response, time.perf_counter_ns() - started


def test_counts_and_durations_match_the_requests_sent_and_the_metrics(server, photos) -> None:
    http, rest = server
    before = stats_of(rest)
    counted = {
        (model, outcome): prometheus(http, "hornet_model_requests_total", model, outcome=outcome)
        for model in (CLASSIFIER, SEGMENTER)
        for outcome in ("success", "failure")
    }
    images_before = prometheus(http, "hornet_model_images_total", CLASSIFIER)
    jpeg = {name: encode(photos[name], "JPEG", quality=85) for name in photos}
    classify = lambda *images: http.post("/classify", files=upload(*images))  # noqa: E731
    v2_body = {
        "inputs": [{
            "name": "encoded_image", "datatype": "BYTES", "shape": [2, 1],
            "data": [base64.b64encode(jpeg[n]).decode() for n in ("rocket", "coffee")],
        }]
    }  # fmt: skip
    sent = [
        lambda: classify(jpeg["chelsea"]),
        lambda: classify(jpeg["astronaut"], jpeg["coffee"], jpeg["portrait"]),
        lambda: http.post(f"/v2/models/{CLASSIFIER}/infer", json=v2_body),
        lambda: http.post("/segment", files=upload(jpeg["rocket"])),  # wide: two tiles
    ]
    start_ms = time.time_ns() // 1_000_000
    answered = [timed(call) for call in sent]
    assert [r.status_code for r, _ in answered] == [200] * 4, [r.text for r, _ in answered]
    answered_ms = time.time_ns() // 1_000_000
    bad = classify(b"not an image")  # reaches the model, fails decoding
    unknown = http.post("/classify", params={"model": "nope"}, files=upload(jpeg["chelsea"]))
    assert (bad.status_code, unknown.status_code) == (415, 404)
    after = stats_of(rest)
    assert stats_of(rest, CLASSIFIER)[CLASSIFIER] == after[CLASSIFIER]

    def grew(model: str, *path: str) -> int:
        old, new = before[model], after[model]
        for key in path:
            old, new = old[key], new[key]
        return new - old

    # requests and images: 3 classification requests of 1 + 3 + 2 images, 1 failure (the
    # unknown model is refused before any model sees it); 1 segmentation request
    assert grew(CLASSIFIER, "inference_stats", "success", "count") == 3
    assert grew(CLASSIFIER, "inference_stats", "fail", "count") == 1
    assert grew(CLASSIFIER, "inference_count") == 6
    assert grew(SEGMENTER, "inference_stats", "success", "count") == 1
    assert grew(SEGMENTER, "inference_count") == 1
    # the same requests in the per-model Prometheus metrics
    sent = {(CLASSIFIER, "success"): 3, (CLASSIFIER, "failure"): 1, (SEGMENTER, "success"): 1,
            (SEGMENTER, "failure"): 0}  # fmt: skip
    for (model, outcome), count in sent.items():
        now = prometheus(http, "hornet_model_requests_total", model, outcome=outcome)
        assert now - counted[model, outcome] == count, (model, outcome)
    assert prometheus(http, "hornet_model_images_total", CLASSIFIER) - images_before == 6
    for model in (CLASSIFIER, SEGMENTER):
        observed = prometheus(http, "hornet_model_request_seconds_count", model)
        assert observed == after[model]["inference_stats"]["success"]["count"]
    tiles = 0
    for model in (CLASSIFIER, SEGMENTER):
        stats = after[model]
        # the last batch ran during the requests above (the failed one ran none)
        assert start_ms <= stats["last_inference"] <= answered_ms
        # batches: the Prometheus counters of the same server, counted elsewhere
        batches = stats["batch_stats"]
        assert stats["execution_count"] == sum(b["compute_infer"]["count"] for b in batches)
        assert stats["execution_count"] == prometheus(http, "hornet_batches_total", model)
        items = sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches)
        assert items == prometheus(http, "hornet_batch_size_sum", model)
        tiles = items
        engine_ns = sum(b["compute_infer"]["ns"] for b in batches)
        assert engine_ns == pytest.approx(
            prometheus(http, "hornet_engine_seconds_sum", model) * NS, rel=1e-6
        )
        # the stages of the successful requests fit in their durations
        inference = stats["inference_stats"]
        stages = ("queue", "compute_input", "compute_infer", "compute_output")
        assert all(inference[s]["count"] == inference["success"]["count"] for s in stages)
        assert sum(inference[s]["ns"] for s in stages) <= inference["success"]["ns"]
        assert all(inference[s]["ns"] > 0 for s in ("compute_input", "compute_infer"))
    assert tiles > after[SEGMENTER]["inference_count"]  # several tiles per image
    # the server's durations within what the client saw of the same requests
    client_ns = sum(ns for _, ns in answered[:3])
    assert grew(CLASSIFIER, "inference_stats", "success", "ns") <= client_ns
    assert grew(SEGMENTER, "inference_stats", "success", "ns") <= answered[3][1]


def test_a_single_image_requests_engine_time_is_its_batchs_run(server, photos) -> None:
    """Each request of one image runs in one batch, so its compute_infer is that batch's
    engine run: summed over the requests, every batch's run times its size."""
    http, rest = server
    image = encode(photos["chelsea"], "JPEG", quality=85)
    before = stats_of(rest, CLASSIFIER)[CLASSIFIER]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: http.post("/classify", files=upload(image)), range(18)))
    assert all(r.status_code == 200 for r in answers)
    after = stats_of(rest, CLASSIFIER)[CLASSIFIER]
    requests_ns = (
        after["inference_stats"]["compute_infer"]["ns"]
        - before["inference_stats"]["compute_infer"]["ns"]
    )
    runs = {b["batch_size"]: b["compute_infer"] for b in before["batch_stats"]}
    batches_ns, batches = 0, 0
    for entry in after["batch_stats"]:
        earlier = runs.get(entry["batch_size"], {"count": 0, "ns": 0})
        batches += entry["compute_infer"]["count"] - earlier["count"]
        batches_ns += entry["batch_size"] * (entry["compute_infer"]["ns"] - earlier["ns"])
    assert after["inference_count"] - before["inference_count"] == 18
    assert after["execution_count"] - before["execution_count"] == batches <= 18
    # each duration is rounded to the nanosecond on its own
    assert abs(requests_ns - batches_ns) <= 2 * 18 + 4 * batches


def test_every_models_statistics_and_the_errors_of_a_models(server) -> None:
    http, rest = server
    every = http.get("/v2/models/stats")
    assert every.status_code == 200
    assert {m["name"] for m in every.json()["model_stats"]} == {CLASSIFIER, SEGMENTER}
    versioned = http.get(f"/v2/models/{CLASSIFIER}/versions/1/stats").json()
    assert [m["name"] for m in versioned["model_stats"]] == [CLASSIFIER]
    assert http.get("/v2").json()["extensions"].count("statistics") == 1
    for path in ("/v2/models/nope/stats", f"/v2/models/{CLASSIFIER}/versions/2/stats"):
        refused = http.get(path)
        assert refused.status_code == 404
        assert refused.json()["error"].startswith("unknown_model")


def test_a_fresh_servers_statistics_are_zero(classifier_dir, tmp_path: Path) -> None:
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1"]
    with (
        running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s,
        httpx.Client(base_url=s.url, timeout=TIMEOUT_S) as http,
    ):
        (stats,) = http.get(f"/v2/models/{CLASSIFIER}/stats").json()["model_stats"]
    assert (stats["inference_count"], stats["execution_count"], stats["last_inference"]) == (0,) * 3
    assert stats["batch_stats"] == []  # the warm-up runs are not requests' batches
    assert all(d == {"count": 0, "ns": 0} for d in stats["inference_stats"].values())
