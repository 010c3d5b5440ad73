"""The response cache (`--response-cache-mib`): an encoded image sent again is answered
from its cached engine results, each answer shaped for its own request exactly as a
server without the cache shapes it (real servers over the three demo models, compared
answer for answer, over the image routes and v2's encoded images); counted in Triton's
statistics (cache_hit, cache_miss, no engine run for a hit); and the cache's bounds."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from service.cache import ENTRY_OVERHEAD_BYTES, ResponseCache
from service.settings import DEMO_BUNDLES_DIR
from service.testing import running_server
from tests.helpers.images import encode, upload

MODELS = ("shapes_classify", "shapes_segment", "shapes_detect")


def scene(seed: int) -> bytes:
    """A JPEG of a few filled shapes on a grey ground, as the demo models know them."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (320, 240), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = (int(v) for v in rng.integers((40, 40, 18), (280, 200, 40)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return encode(np.asarray(image), "JPEG")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The demo models with a 64 MiB cache, and without one."""
    flags = [arg for name in MODELS for arg in ("--model-dir", str(DEMO_BUNDLES_DIR / name))]
    flags += ["--engine-threads", "1"]
    folder = tmp_path_factory.mktemp("response_cache")
    with (
        running_server(
            [*flags, "--response-cache-mib", "64"], log_path=folder / "cached.log",
            inherit_settings=False,
        ) as cached,
        running_server(flags, log_path=folder / "plain.log", inherit_settings=False) as plain,
        httpx.Client(base_url=cached.url, timeout=60) as with_cache,
        httpx.Client(base_url=plain.url, timeout=60) as without,
    ):  # fmt: skip
        yield with_cache, without


def stats(http: httpx.Client, model: str) -> dict:
    (entry,) = http.get(f"/v2/models/{model}/stats").json()["model_stats"]
    return entry


def metrics_of(http: httpx.Client) -> list[tuple[str, dict, float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(http.get("/metrics").text)
        for sample in family.samples
    ]


def post(http: httpx.Client, route: str, image: bytes, **params) -> dict:
    response = http.post(route, params=params, files=upload(image, content_type="image/jpeg"))
    assert response.status_code == 200, response.text
    return response.json()


def test_a_repeated_image_is_answered_from_the_cache_as_without_it(servers) -> None:
    with_cache, without = servers
    image = scene(1)
    before = {model: stats(with_cache, model) for model in MODELS}
    requests = [  # (route, model, the first request's options, the repeat's options)
        ("/classify", "shapes_classify", {"top_k": 3}, {"top_k": 2}),
        ("/segment", "shapes_segment", {}, {}),
        ("/detect", "shapes_detect", {"score_threshold": 0.05}, {"score_threshold": 0.5}),
    ]
    for route, model, first, repeat in requests:
        assert post(with_cache, route, image, **first) == post(without, route, image, **first)
        # the repeat: its own options, shaped from the cached results
        assert post(with_cache, route, image, **repeat) == post(without, route, image, **repeat)
        after = stats(with_cache, model)
        inference = after["inference_stats"]
        earlier = before[model]["inference_stats"]
        hits = inference["cache_hit"]["count"] - earlier["cache_hit"]["count"]
        misses = inference["cache_miss"]["count"] - earlier["cache_miss"]["count"]
        assert (hits, misses) == (1, 1), model
        # the engine ran for the first request only
        assert after["inference_count"] - before[model]["inference_count"] == 1, model
        assert after["execution_count"] - before[model]["execution_count"] == 1, model
        assert inference["cache_hit"]["ns"] > 0
    plain = stats(without, "shapes_classify")["inference_stats"]
    assert plain["cache_hit"]["count"] == plain["cache_miss"]["count"] == 0
    # the same counts on /metrics
    metrics = {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in metrics_of(with_cache)
    }
    for model in MODELS:
        inference = stats(with_cache, model)["inference_stats"]
        for result, field in (("hit", "cache_hit"), ("miss", "cache_miss")):
            key = ("hornet_cache_lookups_total", (("model", model), ("result", result)))
            assert metrics[key] == inference[field]["count"], (model, result)
        assert metrics[("hornet_cache_bytes", (("model", model),))] > 0
    uncached = [
        value for name, labels, value in metrics_of(without) if name == "hornet_cache_lookups_total"
    ]
    assert uncached and not any(uncached)  # the series are there, at zero


def test_v2_encoded_images_share_the_cache_with_the_image_routes(servers) -> None:
    """The same file sent to /classify and then as a v2 `encoded_image` is one entry:
    the v2 request runs no engine, and its probabilities equal a fresh server's."""
    with_cache, without = servers
    image = scene(2)
    post(with_cache, "/classify", image)
    before = stats(with_cache, "shapes_classify")
    body = {
        "inputs": [{"name": "encoded_image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(image).decode()],
                    "parameters": {"content_type": "base64"}}],
        "outputs": [{"name": "probabilities"}],
    }  # fmt: skip
    answers = [
        http.post("/v2/models/shapes_classify/infer", json=body) for http in (with_cache, without)
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert answers[0].json()["outputs"] == answers[1].json()["outputs"]
    after = stats(with_cache, "shapes_classify")
    assert after["execution_count"] == before["execution_count"]
    assert (
        after["inference_stats"]["cache_hit"]["count"]
        == before["inference_stats"]["cache_hit"]["count"] + 1
    )


def test_entries_are_bounded_copied_and_read_only() -> None:
    cache = ResponseCache(capacity=40_000)  # 8 entries of 1000 floats, 5000 bytes at most each
    batch = np.arange(4 * 1000, dtype=np.float32).reshape(4, 1000)
    assert cache.put(b"a", 10, 10, None, [batch[0]])
    (kept,) = cache.get(b"a").results
    assert kept.base is None or kept.base is not batch  # not a view keeping the batch alive
    with pytest.raises(ValueError):
        kept[0] = 1.0  # read-only: no answer can change a cached result
    assert np.array_equal(kept, batch[0])
    # the least recently used goes first once the bytes pass the capacity
    entry = 4000 + ENTRY_OVERHEAD_BYTES
    for key in (b"b", b"c", b"d", b"e", b"f", b"g", b"h", b"i", b"j", b"k", b"l", b"m"):
        cache.get(b"a")  # kept fresh
        cache.put(key, 10, 10, None, [batch[1]])
        assert cache.size <= cache.capacity
    assert cache.get(b"a") is not None and cache.get(b"b") is None
    assert len(cache) == cache.capacity // entry
    # an entry over an eighth of the capacity is not kept (nothing is copied for it)
    assert not cache.put(b"big", 10, 10, None, [np.zeros(3000, dtype=np.float32)])
    assert cache.get(b"big") is None


@pytest.mark.parametrize("model", ["shapes_segment", "shapes_detect"])
def test_v2_answers_from_cached_results_equal_fresh_ones(servers, model) -> None:
    """v2's output tensors for segmentation and detection made from cached (read-only)
    results, twice, equal an uncached server's."""
    with_cache, without = servers
    body = {
        "inputs": [{"name": "encoded_image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(scene(3)).decode()],
                    "parameters": {"content_type": "base64"}}],
    }  # fmt: skip
    route = f"/v2/models/{model}/infer"
    fresh = without.post(route, json=body)
    assert fresh.status_code == 200, fresh.text
    for _ in range(2):  # a miss, then a hit
        cached = with_cache.post(route, json=body)
        assert cached.status_code == 200, cached.text
        assert cached.json()["outputs"] == fresh.json()["outputs"]
    inference = stats(with_cache, model)["inference_stats"]
    assert inference["cache_hit"]["count"] >= 1
