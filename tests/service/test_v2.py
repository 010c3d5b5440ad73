"""The Open Inference Protocol (KServe v2) routes through the ASGI app: metadata, config,
JSON and binary tensors, encoded images, and errors in the protocol's shape."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from service.pipelines import softmax
from tests.helpers import bundles
from tests.helpers.engines import InstrumentedFactory
from tests.helpers.images import encode, upload
from tests.helpers.references import crop_of, official_probabilities, scores_by_index
from tests.helpers.serving import serving

pytestmark = pytest.mark.anyio


def json_infer(name: str, array: np.ndarray, datatype: str = "UINT8", **extra) -> dict:
    return {
        "inputs": [
            {"name": name, "shape": list(array.shape), "datatype": datatype,
             "data": array.reshape(-1).tolist()}
        ],
        **extra,
    }  # fmt: skip


def binary_infer(inputs: list[tuple[str, str, list[int], bytes]], **extra) -> tuple[bytes, dict]:
    """A binary-tensor-extension body and its headers, as tritonclient sends them."""
    header = {
        "inputs": [
            {"name": n, "datatype": t, "shape": s, "parameters": {"binary_data_size": len(d)}}
            for n, t, s, d in inputs
        ],
        **extra,
    }
    head = json.dumps(header).encode()
    body = head + b"".join(d for *_, d in inputs)
    return body, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def read_binary_outputs(response) -> dict[str, np.ndarray]:
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:length])
    data, offset, out = response.content[length:], 0, {}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        out[output["name"]] = np.frombuffer(data[offset : offset + size], "<f4").reshape(
            output["shape"]
        )
        offset += size
    return out


async def test_server_metadata_and_health(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        meta = (await client.get("/v2")).json()
        live = await client.get("/v2/health/live")
        ready = await client.get("/v2/health/ready")
    assert meta["name"] == "hornet-serve"
    assert {"binary_tensor_data", "model_configuration"} <= set(meta["extensions"])
    assert live.status_code == 200 and ready.status_code == 200


async def test_not_ready_until_warm_answers_503_in_the_protocols_shape(classifier_dir) -> None:
    import threading

    gate = threading.Event()
    async with serving(
        [classifier_dir], engine_factory=InstrumentedFactory(gate=gate), wait_ready=False
    ) as client:
        ready = await client.get("/v2/health/ready")
        model = await client.get("/v2/models/tiny_cls")
        gate.set()
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert model.status_code == 503 and model.json()["error"].startswith("not_ready")


async def test_model_metadata_lists_image_and_encoded_inputs_with_batch_axis(
    classifier_dir,
) -> None:
    async with serving([classifier_dir]) as client:
        meta = (await client.get("/v2/models/tiny_cls")).json()
        versioned = (await client.get("/v2/models/tiny_cls/versions/1")).json()
    assert meta == versioned
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]},
        {"name": "encoded_image", "datatype": "BYTES", "shape": [-1, 1]},
    ]
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]


def test_every_engine_has_a_platform_and_backend_name() -> None:
    from typing import get_args

    from service.routers.v2 import _PLATFORMS
    from service.settings import Settings

    engines = get_args(Settings.model_fields["engine"].annotation)
    assert set(engines) == set(_PLATFORMS), "an --engine choice without Triton's names"


async def test_metadata_and_config_name_the_openvino_engine(classifier_dir) -> None:
    """With --engine openvino (metadata and config answered 500, a KeyError, until the
    engine had a platform name here)."""
    pytest.importorskip("openvino")
    async with serving([classifier_dir], engine="openvino") as client:
        meta = await client.get("/v2/models/tiny_cls")
        config = await client.get("/v2/models/tiny_cls/config")
    assert meta.status_code == 200 and meta.json()["platform"] == "openvino"
    assert config.status_code == 200
    assert (config.json()["platform"], config.json()["backend"]) == ("openvino", "openvino")


async def test_model_config_has_tritons_fields_without_the_batch_axis(classifier_dir) -> None:
    async with serving([classifier_dir], max_batch_size=4) as client:
        config = (await client.get("/v2/models/tiny_cls/config")).json()
        ready = await client.get("/v2/models/tiny_cls/ready")
    assert config["name"] == "tiny_cls" and config["max_batch_size"] == 4
    assert config["platform"] == "onnxruntime_onnx"
    image, encoded = config["input"]
    assert (image["data_type"], image["dims"], image["format"]) == (
        "TYPE_UINT8", [224, 224, 3], "FORMAT_NHWC"
    )  # fmt: skip
    assert (encoded["data_type"], encoded["dims"]) == ("TYPE_STRING", [1])
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("logits", "TYPE_FP32", [10]),
        ("probabilities", "TYPE_FP32", [10]),
    ]
    assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_json_uint8_tensor_gives_the_graphs_logits_and_softmax(classifier_dir, photos):
    crops = np.stack([crop_of(photos["chelsea"]), crop_of(photos["astronaut"])])
    async with serving([classifier_dir]) as client:
        response = await client.post("/v2/models/tiny_cls/infer", json=json_infer("image", crops))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "tiny_cls" and body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["logits"]["shape"] == [2, 10] and outputs["logits"]["datatype"] == "FP32"
    logits = np.asarray(outputs["logits"]["data"]).reshape(2, 10)
    probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(2, 10)
    for row, crop in enumerate(crops):
        np.testing.assert_allclose(logits[row], bundles.reference_logits(crop), atol=1e-4)
        np.testing.assert_allclose(
            probabilities[row], bundles.reference_probabilities(crop), atol=1e-5
        )


async def test_fp32_pixels_on_the_255_scale_equal_the_uint8_answer(classifier_dir, photos):
    crop = crop_of(photos["coffee"])[None]
    async with serving([classifier_dir]) as client:
        as_uint8 = await client.post("/v2/models/tiny_cls/infer", json=json_infer("image", crop))
        as_fp32 = await client.post(
            "/v2/models/tiny_cls/infer", json=json_infer("image", crop.astype(np.float32), "FP32")
        )
    assert as_fp32.status_code == 200, as_fp32.text
    assert as_fp32.json()["outputs"] == as_uint8.json()["outputs"]


async def test_encoded_images_as_base64_json_equal_classify(classifier_dir, photos) -> None:
    names = ["chelsea", "portrait"]
    images = [encode(photos[n]) for n in names]
    request = {
        "inputs": [
            {"name": "encoded_image", "shape": [2, 1], "datatype": "BYTES",
             "data": [base64.b64encode(i).decode() for i in images]}
        ],
        "outputs": [{"name": "probabilities"}],
    }  # fmt: skip
    async with serving([classifier_dir]) as client:
        response = await client.post("/v2/models/tiny_cls/infer", json=request)
        classify = await client.post("/classify", params={"top_k": 10}, files=upload(*images))
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    probabilities = np.asarray(output["data"]).reshape(2, 10)
    for row, (name, result) in enumerate(zip(names, classify.json()["results"], strict=True)):
        scores = scores_by_index(result)
        np.testing.assert_allclose(probabilities[row], [scores[i] for i in range(10)], atol=1e-6)
        np.testing.assert_allclose(
            probabilities[row], official_probabilities(photos[name]), rtol=1e-4, atol=1e-7
        )


async def test_binary_inputs_and_outputs(classifier_dir, photos) -> None:
    crops = np.stack([crop_of(photos["rocket"])])
    body, headers = binary_infer(
        [("image", "UINT8", list(crops.shape), crops.tobytes())],
        outputs=[{"name": "logits", "parameters": {"binary_data": True}}],
    )
    async with serving([classifier_dir]) as client:
        response = await client.post("/v2/models/tiny_cls/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    logits = read_binary_outputs(response)["logits"]
    np.testing.assert_allclose(logits[0], bundles.reference_logits(crops[0]), atol=1e-4)


async def test_binary_encoded_images_with_binary_data_output(classifier_dir, photos) -> None:
    image = encode(photos["astronaut"], "JPEG", quality=90)
    body, headers = binary_infer(
        [("encoded_image", "BYTES", [1], bytes_tensor(image))],
        parameters={"binary_data_output": True},
    )
    async with serving([classifier_dir]) as client:
        response = await client.post("/v2/models/tiny_cls/infer", content=body, headers=headers)
        classify = await client.post("/classify", params={"top_k": 10}, files=upload(image))
    outputs = read_binary_outputs(response)
    scores = scores_by_index(classify.json()["results"][0])
    np.testing.assert_allclose(outputs["probabilities"][0], [scores[i] for i in range(10)], 1e-6)
    np.testing.assert_allclose(softmax(outputs["logits"][0]), outputs["probabilities"][0], 1e-6)


async def test_classification_extension_gives_top_k_strings(classifier_dir, photos) -> None:
    crop = crop_of(photos["chelsea"])[None]
    request = json_infer(
        "image", crop, outputs=[{"name": "probabilities", "parameters": {"classification": 3}}]
    )
    async with serving([classifier_dir]) as client:
        response = await client.post("/v2/models/tiny_cls/infer", json=request)
    (output,) = response.json()["outputs"]
    expected = bundles.reference_probabilities(crop[0])
    best = np.argsort(-expected, kind="stable")[:3]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 3]
    assert [entry.split(":")[1:] for entry in output["data"]] == [
        [str(i), f"class{i}"] for i in best
    ]
    assert float(output["data"][0].split(":")[0]) == pytest.approx(expected[best[0]], abs=1e-5)


async def test_v2_requests_share_the_batcher_and_metrics(classifier_dir, photos) -> None:
    crop = crop_of(photos["chelsea"])[None]
    factory = InstrumentedFactory()
    async with serving([classifier_dir], engine_factory=factory) as client:
        warm = len(factory.batch_sizes)
        await client.post("/v2/models/tiny_cls/infer", json=json_infer("image", crop))
        metrics = (await client.get("/metrics")).text
    assert factory.batch_sizes[warm:] == [1]
    assert 'hornet_requests_total{route="/v2/models/{model}/infer",status="200"} 1.0' in metrics


async def test_segment_models_answer_raw_tile_logits(segmenter_dir) -> None:
    tile = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    async with serving([segmenter_dir]) as client:
        meta = (await client.get("/v2/models/tiny_seg")).json()
        response = await client.post("/v2/models/tiny_seg/infer", json=json_infer("image", tile))
    assert [i["name"] for i in meta["inputs"]] == ["image", "encoded_image"]
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", [-1, 4, 64, 64]), ("mask_png", [-1, 1]), ("class_fractions", [-1, 4])
    ]  # fmt: skip
    (output,) = response.json()["outputs"]
    assert output["name"] == "logits" and output["shape"] == [2, 4, 64, 64]


async def test_segment_models_answer_encoded_images_as_the_segment_route(
    segmenter_dir, photos
) -> None:
    """Two photographs of different sizes in one request: each row is /segment's answer
    for that photograph, its mask PNG string for string, its classes' fractions."""
    images = [encode(photos["rocket"], "JPEG", quality=90), encode(photos["coffee"], "PNG")]
    body = {
        "inputs": [{
            "name": "encoded_image", "datatype": "BYTES", "shape": [2, 1],
            "data": [base64.b64encode(image).decode() for image in images],
        }]
    }  # fmt: skip
    async with serving([segmenter_dir]) as client:
        response = await client.post("/v2/models/tiny_seg/infer", json=body)
        segmented = await client.post("/segment", files=upload(*images))
        binary, headers = binary_infer([("encoded_image", "BYTES", [2], bytes_tensor(*images))])
        raw = await client.post("/v2/models/tiny_seg/infer", content=binary, headers=headers)
        logits = dict(body, outputs=[{"name": "logits"}])
        refused = await client.post("/v2/models/tiny_seg/infer", json=logits)
    assert response.status_code == 200 and segmented.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert list(outputs) == ["mask_png", "class_fractions"]
    assert outputs["mask_png"]["shape"] == [2, 1] and outputs["class_fractions"]["shape"] == [2, 4]
    fractions = np.array(outputs["class_fractions"]["data"]).reshape(2, 4)
    for row, expected in enumerate(segmented.json()["results"]):
        assert outputs["mask_png"]["data"][row] == expected["mask_png"]
        present = {c["index"]: c["fraction"] for c in expected["classes"]}
        assert fractions[row] == pytest.approx([present.get(i, 0.0) for i in range(4)])
        assert fractions[row].sum() == pytest.approx(1.0)
    # the images sent as raw bytes (the binary extension) answer the same
    assert raw.status_code == 200, raw.text
    assert raw.json()["outputs"] == response.json()["outputs"]
    assert refused.status_code == 400
    assert "for this request's input the model answers" in refused.json()["error"]


async def test_detect_models_describe_one_encoded_image_and_its_detections_unbatched(
    detector_dir,
) -> None:
    async with serving([detector_dir]) as client:
        meta = await client.get("/v2/models/tiny_det")
        ready = await client.get("/v2/models/tiny_det/versions/1/ready")
        config = (await client.get("/v2/models/tiny_det/config")).json()
    assert meta.status_code == 200 and ready.json() == {"name": "tiny_det", "ready": True}
    assert meta.json()["inputs"] == [
        {"name": "encoded_image", "datatype": "BYTES", "shape": [1, 1]}
    ]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta.json()["outputs"]] == [
        ("boxes", "FP32", [-1, 4]),
        ("scores", "FP32", [-1]),
        ("labels", "INT64", [-1]),
        ("label_names", "BYTES", [-1]),
        ("masks", "BYTES", [-1]),
    ]
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"] == [
        {"name": "encoded_image", "data_type": "TYPE_STRING", "dims": [1, 1], "optional": False}
    ]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("boxes", "TYPE_FP32", [-1, 4]),
        ("scores", "TYPE_FP32", [-1]),
        ("labels", "TYPE_INT64", [-1]),
        ("label_names", "TYPE_STRING", [-1]),
        ("masks", "TYPE_STRING", [-1]),
    ]


async def test_detect_models_answer_the_detect_routes_detections_as_tensors(
    detector_dir,
) -> None:
    image = encode(np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    request = {
        "inputs": [
            {"name": "encoded_image", "shape": [1], "datatype": "BYTES",
             "data": [base64.b64encode(image).decode()]}
        ]
    }  # fmt: skip
    async with serving([detector_dir]) as client:
        reference = (await client.post("/detect", files=upload(image))).json()["results"][0]
        response = await client.post("/v2/models/tiny_det/infer", json=request)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    detections = reference["detections"]
    assert len(detections) == 1  # the fixture graph's second box scores 0.3, under 0.5
    assert outputs["boxes"]["shape"] == [1, 4]
    assert outputs["boxes"]["data"] == [v for d in detections for v in d["box"]]
    assert outputs["scores"]["data"] == [d["score"] for d in detections]
    assert (outputs["labels"]["datatype"], outputs["labels"]["shape"]) == ("INT64", [1])
    assert outputs["labels"]["data"] == [d["index"] for d in detections]
    assert outputs["label_names"]["data"] == [d["label"] for d in detections] == ["cat"]
    assert outputs["masks"]["data"] == [d["mask"]["counts"] for d in detections]
    assert outputs["masks"]["parameters"] == {"height": 48, "width": 80}


async def test_detect_models_answer_empty_tensors_when_nothing_scores_the_threshold(
    detector_dir,
) -> None:
    image = encode(np.zeros((32, 32, 3), np.uint8))
    body, headers = binary_infer(
        [("encoded_image", "BYTES", [1, 1], bytes_tensor(image))],
        parameters={"score_threshold": 0.95, "binary_data_output": True},
    )
    async with serving([detector_dir]) as client:
        response = await client.post("/v2/models/tiny_det/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    outputs = json.loads(response.content[:length])["outputs"]
    assert len(response.content) == length
    assert [(o["name"], o["shape"], o["parameters"]["binary_data_size"]) for o in outputs] == [
        ("boxes", [0, 4], 0),
        ("scores", [0], 0),
        ("labels", [0], 0),
        ("label_names", [0], 0),
        ("masks", [0], 0),
    ]


async def test_detect_models_take_encoded_images_only(detector_dir) -> None:
    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    async with serving([detector_dir]) as client:
        response = await client.post("/v2/models/tiny_det/infer", json=json_infer("image", pixels))
    assert response.status_code == 400
    assert "one of ['encoded_image']" in response.json()["error"]


@pytest.mark.parametrize(
    ("request_body", "status", "fact"),
    [
        ({"inputs": []}, 400, "inputs"),
        ({"inputs": [{"name": "nope", "shape": [1], "datatype": "UINT8", "data": [1]}]}, 400,
         "one of ['image', 'encoded_image']"),
        ({"inputs": [{"name": "image", "shape": [1, 2, 2, 3], "datatype": "UINT8",
                      "data": [0] * 12}]}, 400, "[N, 224, 224, 3]"),
        ({"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                      "data": [0] * 5}]}, 400, "5 data elements"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "UINT8", "data": [300]}]},
         400, "outside 0..255"),
        ({"inputs": [{"name": "encoded_image", "shape": [1], "datatype": "BYTES",
                      "data": ["bm90IGFuIGltYWdl"]}]}, 415, "not a recognised image"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "INT4", "data": [1]}]},
         400, "unknown datatype"),
    ],
)  # fmt: skip
async def test_bad_infer_requests_answer_4xx_with_the_fact(
    classifier_dir, request_body, status, fact
) -> None:
    async with serving([classifier_dir]) as client:
        response = await client.post("/v2/models/tiny_cls/infer", json=request_body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and fact in response.json()["error"]


async def test_unknown_model_and_version_answer_404(classifier_dir) -> None:
    async with serving([classifier_dir]) as client:
        model = await client.get("/v2/models/nope")
        version = await client.post("/v2/models/tiny_cls/versions/7/infer", json={})
    assert model.status_code == 404 and "tiny_cls" in model.json()["error"]
    assert version.status_code == 404 and "version 1" in version.json()["error"]


async def test_too_many_images_and_too_large_bodies_answer_413(classifier_dir) -> None:
    pixels = np.zeros((3, 224, 224, 3), np.uint8)
    body, headers = binary_infer([("image", "UINT8", list(pixels.shape), pixels.tobytes())])
    async with serving([classifier_dir], max_images_per_request=2) as client:
        many = await client.post("/v2/models/tiny_cls/infer", content=body, headers=headers)
    async with serving([classifier_dir], max_upload_mb=0.1) as client:
        large = await client.post("/v2/models/tiny_cls/infer", content=body, headers=headers)
    assert many.status_code == 413 and "limit is 2" in many.json()["error"]
    assert large.status_code == 413


async def test_overload_answers_503_and_timeouts_504(classifier_dir, photos) -> None:
    import anyio

    crop = crop_of(photos["chelsea"])[None]
    request = json_infer("image", crop)
    factory = InstrumentedFactory(delay_s=0.3)
    async with serving(
        [classifier_dir], engine_factory=factory, max_batch_size=1, max_queue_size=1
    ) as client:
        statuses: list[int] = []

        async def one() -> None:
            statuses.append(
                (await client.post("/v2/models/tiny_cls/infer", json=request)).status_code
            )

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(one)
    async with serving(
        [classifier_dir], engine_factory=InstrumentedFactory(delay_s=0.5), request_timeout_s=0.1
    ) as client:
        late = await client.post("/v2/models/tiny_cls/infer", json=request)
    assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
    assert late.status_code == 504 and late.json()["error"].startswith("timeout")
