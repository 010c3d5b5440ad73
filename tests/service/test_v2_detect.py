"""KServe v2 inference on detection models, against a real `python -m service` process:
one encoded image in, and out the detections POST /detect answers for it, as tensors
(boxes, scores, labels, label_names, COCO RLE mask counts). Served: a tiny mmdet-layout
Cascade Mask R-CNN bundle with COCO labels (the released detectors' layout) and the demo
detector (torchvision layout). POST /detect on the same server is the reference."""

from __future__ import annotations

import base64
import functools
import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.settings import DEMO_BUNDLES_DIR
from service.testing import running_server
from tests.helpers.images import encode, upload

CASCADE = "cascade_mask_rcnn_hornet_tiny_7x7"
DEMO = "shapes_detect"
OUTPUTS = ("boxes", "scores", "labels", "label_names", "masks")


@pytest.fixture(scope="module")
def cascade_dir(tiny_mmdet_bundle) -> Path:
    """A tiny random Cascade Mask R-CNN exported as the released detectors are
    (tests/conftest.py): its graph takes the image fitted to (1333, 800) on the host and
    answers 28x28 masks that the host pastes."""
    return tiny_mmdet_bundle


@pytest.fixture(scope="module")
def server(cascade_dir, tmp_path_factory) -> str:
    log_path = tmp_path_factory.mktemp("v2_detect_server") / "server.log"
    flags = ["--model-dir", str(cascade_dir), "--model-dir", str(DEMO_BUNDLES_DIR / DEMO)]
    with running_server([*flags, "--engine-threads", "1"], log_path=log_path) as running:
        yield running.url


@pytest.fixture(scope="module")
def astronaut(photos) -> bytes:
    return encode(photos["astronaut"])


@pytest.fixture(scope="module")
def reference(server, astronaut):
    """POST /detect's detections of the photograph at a score threshold, asked once."""
    return functools.cache(lambda threshold: detect(server, CASCADE, astronaut, threshold))


def detect(server: str, model: str, image: bytes, score_threshold: float = 0.5) -> dict:
    """POST /detect's answer for one image: the reference."""
    response = httpx.post(
        f"{server}/detect",
        params={"model": model, "score_threshold": score_threshold},
        files=upload(image),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def infer(server: str, model: str, body: dict | bytes, headers: dict | None = None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server}/v2/models/{model}/infer", content=content, headers=headers, timeout=60
    )


def json_request(*images: bytes, shape: list[int] | None = None, **parameters) -> dict:
    """Encoded images as JSON data (base64 strings)."""
    encoded = {
        "name": "encoded_image",
        "datatype": "BYTES",
        "shape": shape or [len(images)],
        "data": [base64.b64encode(i).decode() for i in images],
    }
    return {"inputs": [encoded], "parameters": parameters}


def as_detections(outputs: dict[str, list], size: tuple[int, int]) -> list[dict]:
    """The v2 outputs (row-major element lists) as /detect's detections."""
    boxes = np.asarray(outputs["boxes"], dtype=np.float64).reshape(-1, 4)
    return [
        {
            "box": [float(v) for v in box],
            "index": int(index),
            "label": name,
            "score": float(score),
            "mask": {"size": list(size), "counts": counts},
        }
        for box, index, name, score, counts in zip(
            boxes,
            outputs["labels"],
            outputs["label_names"],
            outputs["scores"],
            outputs["masks"],
            strict=True,
        )
    ]


def json_detections(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert tuple(outputs) == OUTPUTS
    size = outputs["masks"]["parameters"]
    count = len(outputs["scores"]["data"])
    assert [outputs[n]["shape"] for n in OUTPUTS] == [[count, 4]] + [[count]] * 4
    data = {name: output["data"] for name, output in outputs.items()}
    return as_detections(data, (size["height"], size["width"]))


def binary_detections(response: httpx.Response) -> list[dict]:
    """The binary tensor extension's answer: JSON header, then each output's bytes."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:length])
    data, offset, outputs = response.content[length:], 0, {}
    dtypes = {"FP32": "<f4", "INT64": "<i8"}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw = data[offset : offset + size]
        if output["datatype"] == "BYTES":
            outputs[output["name"]] = bytes_elements(raw)
        else:
            outputs[output["name"]] = np.frombuffer(raw, dtypes[output["datatype"]]).tolist()
        offset += size
    assert offset == len(data)
    masks = header["outputs"][-1]["parameters"]
    return as_detections(outputs, (masks["height"], masks["width"]))


def bytes_elements(raw: bytes) -> list[str]:
    elements, offset = [], 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    return elements


def test_metadata_and_config_describe_one_encoded_image_and_its_detections(server) -> None:
    meta = httpx.get(f"{server}/v2/models/{CASCADE}", timeout=10).json()
    config = httpx.get(f"{server}/v2/models/{CASCADE}/config", timeout=10).json()
    assert meta["inputs"] == [{"name": "encoded_image", "datatype": "BYTES", "shape": [1, 1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("boxes", "FP32", [-1, 4]),
        ("scores", "FP32", [-1]),
        ("labels", "INT64", [-1]),
        ("label_names", "BYTES", [-1]),
        ("masks", "BYTES", [-1]),
    ]
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("encoded_image", "TYPE_STRING", [1, 1])
    ]
    assert [o["data_type"] for o in config["output"]] == [
        "TYPE_FP32", "TYPE_FP32", "TYPE_INT64", "TYPE_STRING", "TYPE_STRING"
    ]  # fmt: skip


def test_a_photograph_answers_the_detect_routes_detections_with_coco_names(
    server, cascade_dir, astronaut, reference
) -> None:
    detections = json_detections(infer(server, CASCADE, json_request(astronaut, shape=[1, 1])))
    labels = json.loads((cascade_dir / "manifest.json").read_text())["labels"]
    assert len(labels) == 80 and labels[0] == "person" and labels[-1] == "toothbrush"
    assert detections and detections == reference(0.5)["detections"]
    assert all(d["label"] == labels[d["index"]] for d in detections)
    assert all(d["mask"]["size"] == [512, 512] for d in detections)


def test_score_threshold_parameter_keeps_what_detect_keeps(server, astronaut, reference) -> None:
    low, high = 0.1, 0.8
    loose = json_detections(infer(server, CASCADE, json_request(astronaut, score_threshold=low)))
    strict = json_detections(infer(server, CASCADE, json_request(astronaut, score_threshold=high)))
    assert len(loose) > len(strict)
    assert loose == reference(low)["detections"]
    assert strict == reference(high)["detections"]
    assert min(d["score"] for d in loose) >= low


def test_binary_input_and_outputs_answer_as_detect_does(server, astronaut, reference) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "encoded_image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 4 + len(astronaut)},
                }
            ],
            "parameters": {"binary_data_output": True, "score_threshold": 0.3},
        }
    ).encode()
    body = header + struct.pack("<I", len(astronaut)) + astronaut
    response = infer(server, CASCADE, body, {"Inference-Header-Content-Length": str(len(header))})
    assert binary_detections(response) == reference(0.3)["detections"]


def test_named_outputs_are_the_only_ones_answered(server, astronaut, reference) -> None:
    request = json_request(astronaut)
    request["outputs"] = [{"name": "label_names"}, {"name": "scores"}]
    response = infer(server, CASCADE, request)
    assert response.status_code == 200, response.text
    outputs = [(o["name"], o["data"]) for o in response.json()["outputs"]]
    detections = reference(0.5)["detections"]
    assert outputs == [
        ("label_names", [d["label"] for d in detections]),
        ("scores", [d["score"] for d in detections]),
    ]


def test_two_images_in_one_request_answer_400_naming_the_one_image_contract(
    server, astronaut
) -> None:
    response = infer(server, CASCADE, json_request(astronaut, astronaut))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("invalid_infer_request") and "one image per request" in error


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("no image format", 415, "unsupported_media_type"), ("truncated PNG", 400, "bad_image")],
)
def test_a_non_image_element_answers_as_detect_does(server, astronaut, kind, status, code):
    element = b"not an image at all" if kind == "no image format" else astronaut[:20_000]
    response = infer(server, CASCADE, json_request(element))
    reference = httpx.post(
        f"{server}/detect", params={"model": CASCADE}, files=upload(element), timeout=60
    )
    assert (response.status_code, reference.status_code) == (status, status)
    assert response.json()["error"].startswith(code)


@pytest.mark.parametrize(
    ("body", "fact"),
    [
        ({"inputs": [{"name": "encoded_image", "shape": [1], "datatype": "BYTES",
                      "data": ["not base64!"]}]}, "base64"),
        ({"inputs": [{"name": "image", "shape": [1, 2, 2, 3], "datatype": "UINT8",
                      "data": [0] * 12}]}, "one of ['encoded_image']"),
        ({**json_request(b"x"), "parameters": {"score_threshold": 1.5}}, "score_threshold"),
        ({**json_request(b"x"), "parameters": {"score_threshold": "high"}}, "score_threshold"),
    ],
)  # fmt: skip
def test_malformed_requests_answer_400_naming_the_problem(server, body, fact) -> None:
    response = infer(server, CASCADE, body)
    assert response.status_code == 400 and fact in response.json()["error"]


def test_tritonclient_runs_a_detector(server, astronaut, reference) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    try:
        image = httpclient.InferInput("encoded_image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[astronaut]], dtype=object), binary_data=True)
        result = client.infer(CASCADE, [image], parameters={"score_threshold": 0.3})
    finally:
        client.close()
    size = result.get_output("masks")["parameters"]
    outputs = {name: result.as_numpy(name) for name in OUTPUTS}
    outputs["label_names"] = [n.decode() for n in outputs["label_names"]]
    outputs["masks"] = [m.decode() for m in outputs["masks"]]
    detections = as_detections(outputs, (size["height"], size["width"]))
    assert detections == reference(0.3)["detections"]


def test_the_demo_detector_answers_through_the_same_route(server) -> None:
    from model_export.demo.shapes import CLASS_NAMES, generate_scene

    scene = generate_scene(np.random.default_rng(11), 160, 240, num_shapes=(3, 3))
    image = encode(scene.image)
    detections = json_detections(infer(server, DEMO, json_request(image)))
    assert detections == detect(server, DEMO, image)["detections"]
    for label, box in zip(scene.labels, scene.boxes, strict=True):
        assert any(
            d["label"] == CLASS_NAMES[label] and box_iou(box, d["box"]) >= 0.5 for d in detections
        ), (CLASS_NAMES[label], box, detections)


def box_iou(a, b) -> float:
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a, b
    inner = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inner / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inner)
