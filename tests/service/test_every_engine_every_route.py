"""Every route answers on every engine this machine runs, in the layouts that take code
paths of their own: a real server per layout on the three demo bundles, each GET route
of its own OpenAPI document walked for every model, an image through each image route
and each model's v2 infer, and gRPC's model calls.

The schemathesis runs (test_openapi_contract.py) exercise the routes on ONNX Runtime only;
v2 model metadata and config answered 500 with OpenVINO (a table keyed by engine lacked
it) while every test passed. This walk is what would have caught it."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.settings import DEMO_BUNDLES_DIR
from service.testing import LOOPBACK, free_port, running_server

MODELS = ("shapes_classify", "shapes_segment", "shapes_detect")
MEMORY_CAP_BYTES = 4 << 30
TIMEOUT_S = 60
# The engines a CPU machine runs (tensorrt needs NVIDIA's builder; torch is no service
# dependency), each with the package it needs.
ENGINES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def jpeg(width: int = 160, height: int = 120) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def v2_body(metadata: dict) -> dict:
    """An inference request in the model's own first input: its encoded image, or an
    image tensor of zeros at its declared shape."""
    names = [i["name"] for i in metadata["inputs"]]
    if "encoded_image" in names:
        data = [base64.b64encode(jpeg()).decode()]
        tensor = {"name": "encoded_image", "datatype": "BYTES", "shape": [1, 1], "data": data}
    else:
        declared = metadata["inputs"][0]
        shape = [1, *declared["shape"][1:]]
        data = [0] * int(np.prod(shape))
        tensor = {"name": declared["name"], "datatype": declared["datatype"], "shape": shape,
                  "data": data}  # fmt: skip
    return {"inputs": [tensor]}


def _bf16_cpu() -> bool:
    from service.engines import cpu_runs_bf16

    return cpu_runs_bf16()


# Engines, and layouts and precisions of them that take other code paths (several
# instances sharing weights, the solo engine, static shapes, bf16).
LAYOUTS = {
    "onnxruntime": ["--engine", "onnxruntime"],
    "openvino": ["--engine", "openvino"],
    "onnxruntime-2-instances-solo": ["--engine", "onnxruntime", "--instances", "2",
                                     "--solo-engine"],
    "openvino-2-shared-static": ["--engine", "openvino", "--instances", "2", "--share-weights",
                                 "--openvino-static-shapes", "--max-batch-size", "4"],
    "openvino-bf16": ["--engine", "openvino", "--precision", "bf16",
                      "--allow-unverified-precision"],
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_route_answers_for_every_model(layout: str, tmp_path: Path) -> None:
    engine = layout.split("-")[0]
    pytest.importorskip(ENGINES[engine])
    if "bf16" in layout and not _bf16_cpu():
        pytest.skip("this CPU has no bf16 arithmetic (AVX512_BF16 or AMX-BF16)")
    grpc_port = free_port()
    flags = [*LAYOUTS[layout], "--engine-threads", "1", "--grpc-port", str(grpc_port)]
    for model in MODELS:
        flags += ["--model-dir", str(DEMO_BUNDLES_DIR / model)]
    with (
        running_server(
            flags,
            log_path=tmp_path / "server.log",
            inherit_settings=False,
            memory_limit_bytes=MEMORY_CAP_BYTES,
        ) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as http,
    ):
        walked, failures = 0, []
        for path, operations in http.get("/openapi.json").json()["paths"].items():
            if "get" not in operations:
                continue
            for model in MODELS if "{model}" in path else (None,):
                url = path.replace("{version}", "1")
                url = url.replace("{model}", model) if model else url
                answer = http.get(url)
                walked += 1
                if answer.status_code != 200:
                    failures.append(f"GET {url}: {answer.status_code} {answer.text[:200]}")
        assert walked > 20 and not failures, "\n".join(failures)

        for route in ("/classify", "/segment", "/detect"):
            answer = http.post(route, content=jpeg(), headers={"content-type": "image/jpeg"})
            assert answer.status_code == 200, (route, answer.text[:300])
            assert route == "/classify" or answer.json()["results"][0]["width"] == 160
        for model in MODELS:
            metadata = http.get(f"/v2/models/{model}").json()
            answer = http.post(f"/v2/models/{model}/infer", json=v2_body(metadata))
            assert answer.status_code == 200, (model, answer.text[:300])
            answered = [o["name"] for o in answer.json()["outputs"]]
            declared = [o["name"] for o in metadata["outputs"]]
            assert answered and set(answered) <= set(declared), (answered, declared)

        grpcclient = pytest.importorskip("tritonclient.grpc")
        with grpcclient.InferenceServerClient(f"{LOOPBACK}:{grpc_port}") as client:
            for model in MODELS:
                rest = http.get(f"/v2/models/{model}").json()
                assert client.get_model_metadata(model).platform == rest["platform"]
                assert client.get_model_config(model).config.name == model
                (stats,) = client.get_inference_statistics(model).model_stats
                assert stats.inference_count >= 1 and stats.execution_count >= 1
