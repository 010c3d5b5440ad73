"""The HTTP routes through the ASGI app: answers, model listing, health and metrics."""

from __future__ import annotations

import base64
import io
import json
import threading

import anyio
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from tests.helpers import bundles
from tests.helpers.engines import InstrumentedFactory
from tests.helpers.images import encode, upload
from tests.helpers.references import assert_official_scores, official_probabilities, scores_by_index
from tests.helpers.serving import serving, wait_until_ready

pytestmark = pytest.mark.anyio


async def test_classify_answers_official_softmax_per_image_in_upload_order(
    classifier_dir, photos
) -> None:
    names = ["chelsea", "astronaut", "portrait"]
    async with serving([classifier_dir]) as client:
        response = await client.post(
            "/classify",
            params={"top_k": 10},
            files=upload(*(encode(photos[n]) for n in names)),
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny_cls" and len(body["results"]) == len(names)
    for name, result in zip(names, body["results"], strict=True):
        expected = official_probabilities(photos[name])
        got = scores_by_index(result)
        assert [e["index"] for e in result["top_k"]] == list(np.argsort(-expected, kind="stable"))
        np.testing.assert_allclose([got[i] for i in range(10)], expected, atol=1e-5)
        assert all(e["label"] == f"class{e['index']}" for e in result["top_k"])


async def test_classify_top_k_limits_the_classes_returned(classifier_dir, photos) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.post(
            "/classify", params={"top_k": 3}, files=upload(encode(photos["coffee"]))
        )
    (result,) = response.json()["results"]
    scores = [e["score"] for e in result["top_k"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


async def test_classify_accepts_a_raw_image_body(classifier_dir, photos) -> None:
    data = encode(photos["rocket"], "JPEG", quality=90)
    async with serving([classifier_dir]) as client:
        raw = await client.post("/classify", content=data, headers={"content-type": "image/jpeg"})
        form = await client.post("/classify", files=upload(data, content_type="image/jpeg"))
    assert raw.status_code == 200
    assert raw.json() == form.json()


async def test_segment_answers_a_mask_at_the_input_size_with_class_fractions(
    segmenter_dir, photos
) -> None:
    async with serving([segmenter_dir]) as client:
        response = await client.post("/segment", files=upload(encode(photos["chelsea"])))
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask_png"]))))
    assert mask.shape == (300, 451) == (result["height"], result["width"])
    fractions = {c["index"]: c["fraction"] for c in result["classes"]}
    assert sum(fractions.values()) == pytest.approx(1.0)
    for index, fraction in fractions.items():
        assert np.mean(mask == index) == pytest.approx(fraction)
        assert result["classes"][0]["label"].startswith("seg")


async def test_segment_tiles_of_one_image_are_batched_together(segmenter_dir, photos) -> None:
    factory = InstrumentedFactory()
    async with serving([segmenter_dir], engine_factory=factory, max_delay_ms=20) as client:
        response = await client.post("/segment", files=upload(encode(photos["chelsea"])))
    assert response.status_code == 200
    assert max(factory.batch_sizes) > 1  # 64x96 fitted image -> two 64x64 tiles


async def test_detect_answers_boxes_in_input_pixels_with_rle_masks(detector_dir, photos) -> None:
    array = photos["chelsea"]
    async with serving([detector_dir]) as client:
        response = await client.post(
            "/detect", params={"score_threshold": 0.5}, files=upload(encode(array))
        )
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert (result["width"], result["height"]) == (451, 300)
    (detection,) = result["detections"]  # the 0.3 one is below the threshold
    np.testing.assert_allclose(detection["box"], bundles.DET_BOXES[0] * [451, 300, 451, 300])
    assert detection["label"] == "cat" and detection["score"] == pytest.approx(0.9)
    rle = detection["mask"]
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded, (array[..., 0] / 255.0 > 0.5).astype(np.uint8))


async def test_detect_score_threshold_keeps_lower_scores(detector_dir, photos) -> None:
    async with serving([detector_dir]) as client:
        response = await client.post(
            "/detect", params={"score_threshold": 0.1}, files=upload(encode(photos["coffee"]))
        )
    assert [d["label"] for d in response.json()["results"][0]["detections"]] == ["cat", "dog"]


async def test_models_lists_every_bundle_with_its_settings(
    classifier_dir, segmenter_dir, detector_dir
) -> None:
    async with serving(
        [classifier_dir, segmenter_dir, detector_dir], max_batch_size=4, instances=2
    ) as client:
        body = (await client.get("/v1/models")).json()
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == {"tiny_cls", "tiny_seg", "tiny_det"}
    cls = models["tiny_cls"]
    assert cls["task"] == "classify" and cls["variant"] == "test_classify"
    assert cls["input_size"] == [224, 224] and cls["labels"] == 10
    assert cls["engine"].startswith("onnxruntime")
    assert cls["weight_copies"] == 1  # two one-thread instances share one session
    assert cls["batching"] == {
        "max_batch_size": 4,
        "max_delay_ms": 2.0,
        "close_early": True,
        "max_queue_size": 64,
        "instances": 2,
        "solo_engine": False,
    }
    assert cls["ready"] is True and cls["demo"] is False


async def test_with_several_models_of_a_task_the_model_is_chosen_by_name(
    classifier_dir, host_normalised_dir, photos
) -> None:
    async with serving([classifier_dir, host_normalised_dir]) as client:
        image = encode(photos["coffee"])
        named = await client.post(
            "/classify", params={"model": "tiny_cls_nchw", "top_k": 10}, files=upload(image)
        )
        unnamed = await client.post("/classify", files=upload(image))
    assert named.json()["model"] == "tiny_cls_nchw"
    assert_official_scores(named.json()["results"][0], photos["coffee"])
    assert unnamed.status_code == 422 and "tiny_cls_nchw" in unnamed.text


async def test_healthz_answers_while_models_are_still_loading(classifier_dir) -> None:
    gate = threading.Event()
    factory = InstrumentedFactory(gate=gate)
    async with serving([classifier_dir], engine_factory=factory, wait_ready=False) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok", "detail": ""}
        gate.set()


async def test_readyz_is_503_before_warm_up_and_200_after(classifier_dir, photos) -> None:
    gate = threading.Event()
    factory = InstrumentedFactory(gate=gate)
    async with serving([classifier_dir], engine_factory=factory, wait_ready=False) as client:
        before = await client.get("/readyz")
        early = await client.post("/classify", files=upload(encode(photos["coffee"])))
        gate.set()
        await wait_until_ready(client)
        after = await client.get("/readyz")
        later = await client.post("/classify", files=upload(encode(photos["coffee"])))
    assert before.status_code == 503 and before.json()["status"] == "not_ready"
    assert before.headers["retry-after"]
    assert early.status_code == 503 and early.json()["error"] == "not_ready"
    assert after.status_code == 200 and after.json()["status"] == "ready"
    assert later.status_code == 200
    assert factory.batch_sizes[0] == 1  # the warm-up ran before readiness


async def test_readyz_reports_a_bundle_that_failed_to_load(tmp_path) -> None:
    async with serving([tmp_path / "missing"], wait_ready=False) as client:
        with anyio.fail_after(10):
            while not client.app.state.pool.load_error:
                await anyio.sleep(0.01)
        response = await client.get("/readyz")
    assert response.status_code == 503 and "missing" in response.json()["detail"]


async def test_metrics_expose_batch_sizes_requests_and_latency(classifier_dir, photos) -> None:
    async with serving([classifier_dir]) as client:
        await client.post("/classify", files=upload(encode(photos["coffee"])))
        await client.post(
            "/classify", content=b"not an image", headers={"content-type": "image/png"}
        )
        text = (await client.get("/metrics")).text
    assert 'hornet_batch_size_count{model="tiny_cls"}' in text
    # the lone request's batch closed as soon as nothing more was on its way
    assert 'hornet_batches_total{closed_by="early",model="tiny_cls"} 1.0' in text
    assert 'hornet_batches_total{closed_by="delay",model="tiny_cls"} 0.0' in text
    assert 'hornet_batches_total{closed_by="full",model="tiny_cls"} 0.0' in text
    assert 'hornet_requests_total{route="/classify",status="200"} 1.0' in text
    assert 'hornet_requests_total{route="/classify",status="415"} 1.0' in text
    # one image decoded, in full; the refused upload never was
    assert 'hornet_decoded_images_total{model="tiny_cls",reduction="1"} 1.0' in text
    assert 'hornet_decoded_images_total{model="tiny_cls",reduction="8"} 0.0' in text
    assert 'hornet_decode_seconds_count{model="tiny_cls"} 1.0' in text
    for name in (
        "hornet_request_seconds_bucket",
        "hornet_queue_seconds_bucket",
        "hornet_engine_seconds_bucket",
        "hornet_queue_depth",
        "hornet_in_flight_requests",
    ):
        assert name in text


async def test_every_response_carries_a_request_id(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        given = await client.get("/healthz", headers={"x-request-id": "trace-42"})
        fresh = await client.get("/healthz")
    assert given.headers["x-request-id"] == "trace-42"
    assert len(fresh.headers["x-request-id"]) == 32


async def test_openapi_documents_the_inference_routes(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        docs = await client.get("/docs")
        spec = json.loads((await client.get("/openapi.json")).text)
    assert docs.status_code == 200
    assert {"/classify", "/segment", "/detect", "/v1/models", "/readyz"} <= set(spec["paths"])
