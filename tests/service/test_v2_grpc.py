"""The Open Inference Protocol (KServe v2) over gRPC: tritonclient's gRPC client against a
real `python -m service --grpc-port N` process. Its answers equal the same server's REST
routes (/classify, /v2 through tritonclient's HTTP client), its errors are those routes'
as gRPC status codes, API keys travel in the call's metadata, and the protocol definitions
match tritonclient's own and protoc's compilation of service/grpc_v2/grpc_predict_v2.proto."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import queue
import signal
import socket
import ssl
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

import service
from service.testing import LOOPBACK, RunningServer, free_port, running_server
from tests.helpers.images import encode, upload
from tests.helpers.references import crop_of, scores_by_index

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")

MODEL = "tiny_cls"
NAMES = ("chelsea", "astronaut", "portrait")
KEY = "hornet-test-key-grpc-4e1b7c9a20d6"
WRONG_KEY = "hornet-test-key-grpc-wrong-00000"
UPLOAD_LIMIT_MB = 1
MEMORY_CAP_BYTES = 4 << 30  # address space, as tests/service/test_v2_hostile.py's servers
CALL_TIMEOUT_S = 30
PROTO_DIR = Path(service.__file__).resolve().parent / "grpc_v2"
PROTO = "grpc_predict_v2.proto"
CONFIG_PROTO = "model_config.proto"
HEALTH_PROTO = "health.proto"
DESCRIPTORS = "grpc_predict_v2.binpb"
SERVICE = "GRPCInferenceService"
RPCS = {
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    "ModelConfig", "ModelStatistics", "RepositoryIndex", "ModelStreamInfer",
    "RepositoryModelLoad", "RepositoryModelUnload", "LogSettings", "TraceSetting",
}  # fmt: skip
# The REST status of an error, and the gRPC status the same error has.
GRPC_STATUS_OF_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# tritonclient's channel options (no message size limit of the client's own), and no
# proxy: straight to the loopback port.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.enable_http_proxy", 0),
]
GOOD_PIXELS = np.random.default_rng(7).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)


class Served(NamedTuple):
    server: RunningServer
    grpc_port: int
    client: grpcclient.InferenceServerClient  # gRPC
    stub: object  # tritonclient's GRPCInferenceServiceStub, for hand-built requests
    rest: httpclient.InferenceServerClient  # the same server's REST v2 routes
    http: httpx.Client
    baseline: np.ndarray  # REST v2 probabilities of GOOD_PIXELS


def connect(port: int) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"{LOOPBACK}:{port}", channel_args=CHANNEL_ARGS)


def grpc_input(name: str, datatype: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def http_input(name: str, datatype: str, array: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=True)
    return tensor


def rest_infer(
    rest: httpclient.InferenceServerClient,
    name: str,
    datatype: str,
    array: np.ndarray,
    outputs: Iterable[str] = ("logits", "probabilities"),
    **options,
) -> dict[str, np.ndarray]:
    """The REST v2 route's answer, as binary tensors."""
    requested = [httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs]
    result = rest.infer(MODEL, [http_input(name, datatype, array)], outputs=requested, **options)
    return {o: result.as_numpy(o) for o in outputs}


def grpc_infer(
    client: grpcclient.InferenceServerClient, name: str, datatype: str, array: np.ndarray, **options
) -> dict[str, np.ndarray]:
    result = client.infer(
        MODEL, [grpc_input(name, datatype, array)], client_timeout=CALL_TIMEOUT_S, **options
    )
    return {o: result.as_numpy(o) for o in ("logits", "probabilities")}


def classify_scores(http: httpx.Client, images: list[bytes]) -> np.ndarray:
    response = http.post("/classify", params={"top_k": 10}, files=upload(*images))
    assert response.status_code == 200, response.text
    return np.array(
        [[scores_by_index(r)[i] for i in range(10)] for r in response.json()["results"]]
    )


def refusal(call: Callable[[], object]) -> grpcclient.InferenceServerException:
    """The error `call` raises (it must raise one)."""
    with pytest.raises(grpcclient.InferenceServerException) as raised:
        call()
    return raised.value


def status(name: str) -> str:
    """A gRPC status as tritonclient's exceptions give it: "StatusCode.NAME"."""
    return str(getattr(grpc.StatusCode, name))


def error_code(rest_error: str) -> str:
    """The CODE of a REST error's "CODE: what was wrong"."""
    return rest_error.split(":", 1)[0]


def assert_still_serving(served: Served) -> None:
    probabilities = grpc_infer(served.client, "image", "UINT8", GOOD_PIXELS)["probabilities"]
    assert np.array_equal(probabilities, served.baseline)


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs of the TCP sockets process `pid` listens on (Linux: its
    socket inodes looked up in /proc/PID/net/tcp*); IPv4-mapped IPv6 addresses as IPv4."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    sockets = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].rsplit(":", 1)
            sockets.add((_address(address), int(port, 16)))
    return sockets


def _address(hex_words: str) -> str:
    """/proc/net/tcp*'s address: 32-bit words, each in the host's byte order."""
    raw = bytes.fromhex(hex_words)
    step = -1 if sys.byteorder == "little" else 1
    ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::step] for i in range(0, len(raw), 4)))
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


def http_port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def served(classifier_dir, tmp_path_factory) -> Iterator[Served]:
    """A real server with --grpc-port (and a 1 MB upload limit), its address space
    capped; its gRPC and REST clients, and the REST answer to GOOD_PIXELS."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1", "--max-batch-size", "4",
             "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--grpc-port", str(port)]  # fmt: skip
    log_path = tmp_path_factory.mktemp("grpc_server") / "server.log"
    with (
        running_server(
            flags,
            log_path=log_path,
            inherit_settings=False,
            memory_limit_bytes=MEMORY_CAP_BYTES,
        ) as server,
        httpx.Client(base_url=server.url, timeout=CALL_TIMEOUT_S) as http,
        connect(port) as client,
        grpc.insecure_channel(f"{LOOPBACK}:{port}", options=CHANNEL_ARGS) as channel,
    ):
        rest = httpclient.InferenceServerClient(
            server.url.removeprefix("http://"), network_timeout=CALL_TIMEOUT_S
        )
        try:
            baseline = rest_infer(rest, "image", "UINT8", GOOD_PIXELS)["probabilities"]
            stub = grpcclient.service_pb2_grpc.GRPCInferenceServiceStub(channel)
            yield Served(server, port, client, stub, rest, http, baseline)
        finally:
            rest.close()


# -- health and metadata ------------------------------------------------------------------


def test_health_and_metadata_equal_the_rest_routes(served) -> None:
    client, http = served.client, served.http
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    server = client.get_server_metadata()
    rest_server = http.get("/v2").json()
    assert server.name == "hornet-serve" == rest_server["name"]
    assert server.version == rest_server["version"]
    assert "classification" in server.extensions

    metadata = client.get_model_metadata(MODEL)
    rest = http.get(f"/v2/models/{MODEL}").json()
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        rest["name"], rest["versions"], rest["platform"]
    )  # fmt: skip
    for ours, theirs in ((metadata.inputs, rest["inputs"]), (metadata.outputs, rest["outputs"])):
        assert [(t.name, t.datatype, list(t.shape)) for t in ours] == [
            (t["name"], t["datatype"], t["shape"]) for t in theirs
        ]
    assert [t.name for t in metadata.inputs] == ["image", "encoded_image"]


def test_rpcs_outside_the_served_set_answer_unimplemented(served) -> None:
    for call in (
        lambda: served.client.get_system_shared_memory_status(),
        lambda: served.client.get_cuda_shared_memory_status(),
    ):
        assert refusal(call).status() == status("UNIMPLEMENTED")


def test_the_repository_index_is_the_rest_routes(served) -> None:
    from google.protobuf import json_format

    rest = served.http.post("/v2/repository/index").json()
    assert rest == [{"name": MODEL, "version": "1", "state": "READY"}]
    expected = json_format.ParseDict(
        {"models": rest}, grpcclient.service_pb2.RepositoryIndexResponse()
    )
    assert served.client.get_model_repository_index() == expected
    ready = served.stub.RepositoryIndex(
        grpcclient.service_pb2.RepositoryIndexRequest(ready=True), timeout=CALL_TIMEOUT_S
    )
    assert ready == expected
    with pytest.raises(grpc.RpcError) as named:
        served.stub.RepositoryIndex(
            grpcclient.service_pb2.RepositoryIndexRequest(repository_name="models"),
            timeout=CALL_TIMEOUT_S,
        )
    assert named.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_model_config_is_the_rest_routes_as_tritons_message(served) -> None:
    """tritonclient's own ModelConfig class decodes the answer; it equals the REST
    route's JSON read into that class."""
    from google.protobuf import json_format

    rest = served.http.get(f"/v2/models/{MODEL}/config").json()
    expected = json_format.ParseDict(rest, grpcclient.model_config_pb2.ModelConfig())
    for version in ("", "1"):
        config = served.client.get_model_config(MODEL, version).config
        assert config == expected
    assert (config.name, config.max_batch_size, config.platform) == (MODEL, 4, "onnxruntime_onnx")
    image = config.input[0]
    assert (image.name, list(image.dims), image.optional) == ("image", [224, 224, 3], True)
    assert image.data_type == grpcclient.model_config_pb2.TYPE_UINT8
    assert image.format == grpcclient.model_config_pb2.ModelInput.FORMAT_NHWC
    refused = refusal(lambda: served.client.get_model_config("no-such-model"))
    assert refused.status() == status("NOT_FOUND")


def test_statistics_are_the_rest_routes_and_count_grpc_calls(served) -> None:
    """Two ModelInfer calls of 2 and 1 images add 2 successes and 3 inferences; the
    statistics then equal the REST route's, model by model and for every model."""
    from google.protobuf import json_format

    def rest_stats(path: str) -> dict:
        return served.http.get(path).json()

    before = rest_stats(f"/v2/models/{MODEL}/stats")["model_stats"][0]
    for count in (2, 1):
        grpc_infer(served.client, "image", "UINT8", np.repeat(GOOD_PIXELS, count, axis=0))
    ours = served.client.get_inference_statistics(MODEL)
    everyone = served.client.get_inference_statistics("")
    after = rest_stats(f"/v2/models/{MODEL}/stats")
    expected = json_format.ParseDict(after, grpcclient.service_pb2.ModelStatisticsResponse())
    assert ours == expected
    assert everyone == json_format.ParseDict(
        rest_stats("/v2/models/stats"), grpcclient.service_pb2.ModelStatisticsResponse()
    )
    (model,) = ours.model_stats
    assert (model.name, model.version) == (MODEL, "1")
    success = model.inference_stats.success
    assert success.count == before["inference_stats"]["success"]["count"] + 2
    assert model.inference_count == before["inference_count"] + 3
    refused = refusal(lambda: served.client.get_inference_statistics("no-such-model"))
    assert refused.status() == status("NOT_FOUND")


# -- inference ----------------------------------------------------------------------------


def test_encoded_images_as_bytes_equal_classify_and_the_rest_route(served, photos) -> None:
    images = [encode(photos[n], "JPEG", quality=85) for n in NAMES]
    encoded = np.array(images, dtype=object)
    answer = grpc_infer(served.client, "encoded_image", "BYTES", encoded)
    rest = rest_infer(served.rest, "encoded_image", "BYTES", encoded)
    probabilities = answer["probabilities"]
    assert probabilities.shape == (3, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, classify_scores(served.http, images), atol=1e-6)
    assert np.array_equal(probabilities, rest["probabilities"])
    assert np.array_equal(answer["logits"], rest["logits"])


def test_uint8_image_tensor_equals_the_rest_route_bit_for_bit(served, photos) -> None:
    crops = np.stack([crop_of(photos[n]) for n in NAMES])
    answer = grpc_infer(served.client, "image", "UINT8", crops)
    rest = rest_infer(served.rest, "image", "UINT8", crops)
    assert answer["logits"].shape == (3, 10) and answer["logits"].dtype == np.float32
    assert np.array_equal(answer["logits"], rest["logits"])
    assert np.array_equal(answer["probabilities"], rest["probabilities"])


def test_tensor_contents_equal_raw_input_contents(served, photos) -> None:
    """The same tensors in InferTensorContents (uint_contents, bytes_contents of shape
    [N, 1]) instead of raw_input_contents; outputs come back in raw_output_contents."""
    crops = np.stack([crop_of(photos[n]) for n in NAMES[:2]])
    images = [encode(photos[n]) for n in NAMES[:2]]
    pb = grpcclient.service_pb2

    def infer_contents(name: str, datatype: str, shape: list[int], **contents) -> dict:
        tensor = pb.ModelInferRequest.InferInputTensor(
            name=name, datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
        )
        request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
        response = served.stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        assert len(response.raw_output_contents) == len(response.outputs) == 2
        assert response.model_name == MODEL
        return {
            o.name: np.frombuffer(raw, "<f4").reshape(list(o.shape))
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
            if o.datatype == "FP32"
        }

    pixels = infer_contents("image", "UINT8", list(crops.shape), uint_contents=crops.ravel())
    encoded = infer_contents("encoded_image", "BYTES", [2, 1], bytes_contents=images)
    raw_pixels = grpc_infer(served.client, "image", "UINT8", crops)
    raw_encoded = grpc_infer(served.client, "encoded_image", "BYTES", np.array(images, object))
    for answer, raw in ((pixels, raw_pixels), (encoded, raw_encoded)):
        assert answer.keys() == {"logits", "probabilities"}
        for name in answer:
            assert np.array_equal(answer[name], raw[name])


def test_classification_extension_equals_the_rest_routes_strings(served, photos) -> None:
    crops = np.stack([crop_of(photos[n]) for n in NAMES[:2]])
    top = grpcclient.InferRequestedOutput("probabilities", class_count=3)
    result = served.client.infer(
        MODEL, [grpc_input("image", "UINT8", crops)], outputs=[top], client_timeout=CALL_TIMEOUT_S
    )
    classes = result.as_numpy("probabilities")
    rest_top = httpclient.InferRequestedOutput("probabilities", binary_data=True, class_count=3)
    rest = served.rest.infer(MODEL, [http_input("image", "UINT8", crops)], outputs=[rest_top])
    assert classes.shape == (2, 3)
    assert classes.tolist() == rest.as_numpy("probabilities").tolist()
    probabilities = grpc_infer(served.client, "image", "UINT8", crops)["probabilities"]
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
    assert [[int(c.split(b":")[1]) for c in row] for row in classes] == best.tolist()


# -- errors -------------------------------------------------------------------------------

_JPEG = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
_TINY_PNG = encode(np.full((8, 8, 3), 128, np.uint8))
_ZEROS = np.zeros((1, 224, 224, 3), np.uint8)
BAD_REQUESTS = {
    "truncated_jpeg": (
        MODEL, "encoded_image", "BYTES", np.array([_JPEG[: len(_JPEG) // 2]], dtype=object),
        "INVALID_ARGUMENT", "bad_image",
    ),
    "not_an_image": (
        MODEL, "encoded_image", "BYTES", np.array([b"not an image at all"], dtype=object),
        "INVALID_ARGUMENT", "unsupported_media_type",
    ),
    "unknown_model": ("nope", "image", "UINT8", _ZEROS, "NOT_FOUND", "unknown_model"),
    "wrong_input_name": (
        MODEL, "pixels", "UINT8", _ZEROS, "INVALID_ARGUMENT", "invalid_infer_request"
    ),
    "too_many_images": (  # over the default max_images_per_request, 64
        MODEL, "encoded_image", "BYTES", np.array([_TINY_PNG] * 65, dtype=object),
        "RESOURCE_EXHAUSTED", "payload_too_large",
    ),
    "wrong_shape": (
        MODEL, "image", "UINT8", np.zeros((1, 8, 8, 3), np.uint8),
        "INVALID_ARGUMENT", "invalid_infer_request",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "name", "datatype", "array", "grpc_status", "code"),
    list(BAD_REQUESTS.values()),
    ids=list(BAD_REQUESTS),
)
def test_a_bad_request_answers_the_rest_routes_error_as_a_grpc_status(
    served, model, name, datatype, array, grpc_status, code
) -> None:
    """The same CODE as the REST route's error, its HTTP status mapped to gRPC's; the
    server answers the next request as before."""
    refused = refusal(
        lambda: served.client.infer(
            model, [grpc_input(name, datatype, array)], client_timeout=CALL_TIMEOUT_S
        )
    )
    with pytest.raises(httpclient.InferenceServerException) as rest:
        served.rest.infer(model, [http_input(name, datatype, array)])
    assert error_code(rest.value.message()) == code
    assert GRPC_STATUS_OF_HTTP[int(rest.value.status())] == grpc_status
    assert refused.status() == status(grpc_status), refused
    assert refused.message().startswith(f"{code}: "), refused
    assert_still_serving(served)


def test_metadata_of_an_unknown_model_is_not_found(served) -> None:
    rest = served.http.get("/v2/models/nope")
    assert rest.status_code == 404
    for call in (
        lambda: served.client.get_model_metadata("nope"),
        lambda: served.client.is_model_ready("nope"),
    ):
        refused = refusal(call)
        assert refused.status() == status("NOT_FOUND"), refused
        assert refused.message().startswith(f"{error_code(rest.json()['error'])}: "), refused


def test_a_message_over_the_upload_limit_is_refused_and_one_under_it_served(served) -> None:
    big = np.array([b"\xff\xd8" + b"\0" * (2 * UPLOAD_LIMIT_MB << 20)], dtype=object)
    refused = refusal(lambda: grpc_infer(served.client, "encoded_image", "BYTES", big))
    assert refused.status() == status("RESOURCE_EXHAUSTED"), refused
    assert_still_serving(served)
    noise = np.random.default_rng(1).integers(0, 256, (540, 540, 3), dtype=np.uint8)
    image = encode(noise)  # PNG of noise: about 0.9 MB, just under the limit
    assert 0.8 * (UPLOAD_LIMIT_MB << 20) < len(image) < 0.95 * (UPLOAD_LIMIT_MB << 20)
    answer = grpc_infer(served.client, "encoded_image", "BYTES", np.array([image], object))
    np.testing.assert_allclose(
        answer["probabilities"], classify_scores(served.http, [image]), atol=1e-6
    )


# -- API keys -----------------------------------------------------------------------------


class Keyed(NamedTuple):
    server: RunningServer
    grpc_port: int
    client: grpcclient.InferenceServerClient


@pytest.fixture(scope="module")
def keyed(classifier_dir, tmp_path_factory) -> Iterator[Keyed]:
    """A real server with --api-key, its gRPC port from HORNET_GRPC_PORT."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1", "--max-batch-size", "4",
             "--api-key", KEY]  # fmt: skip
    log_path = tmp_path_factory.mktemp("grpc_keyed_server") / "server.log"
    with (
        running_server(
            flags,
            log_path=log_path,
            env={"HORNET_GRPC_PORT": str(port)},
            inherit_settings=False,
            memory_limit_bytes=MEMORY_CAP_BYTES,
        ) as server,
        connect(port) as client,
    ):
        yield Keyed(server, port, client)


def test_without_a_key_only_the_health_probes_answer(keyed) -> None:
    client = keyed.client
    rest = httpx.get(f"{keyed.server.url}/v2/models/{MODEL}", timeout=CALL_TIMEOUT_S)
    assert rest.status_code == 401
    assert client.is_server_live() and client.is_server_ready()
    pixels = grpc_input("image", "UINT8", GOOD_PIXELS)
    for call in (
        lambda: client.infer(MODEL, [pixels], client_timeout=CALL_TIMEOUT_S),
        lambda: client.get_model_metadata(MODEL),
        lambda: client.is_model_ready(MODEL),
        lambda: client.get_server_metadata(),
        lambda: client.get_model_config(MODEL),
        lambda: client.get_inference_statistics(MODEL),
    ):
        refused = refusal(call)
        assert refused.status() == status("UNAUTHENTICATED"), refused
        assert refused.message().startswith(f"{error_code(rest.json()['error'])}: "), refused


@pytest.mark.parametrize(
    "headers",
    [{"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}],
    ids=["authorization_bearer", "x_api_key"],
)
def test_a_key_in_the_calls_metadata_is_served(keyed, headers) -> None:
    client = keyed.client
    metadata = client.get_model_metadata(MODEL, headers=headers)
    assert [t.name for t in metadata.inputs] == ["image", "encoded_image"]
    answer = grpc_infer(client, "image", "UINT8", GOOD_PIXELS, headers=headers)
    rest = httpclient.InferenceServerClient(keyed.server.url.removeprefix("http://"))
    try:
        expected = rest_infer(
            rest, "image", "UINT8", GOOD_PIXELS, headers={"Authorization": f"Bearer {KEY}"}
        )
    finally:
        rest.close()
    assert np.array_equal(answer["probabilities"], expected["probabilities"])


@pytest.mark.parametrize(
    "headers",
    [{"authorization": f"Bearer {WRONG_KEY}"}, {"x-api-key": WRONG_KEY}],
    ids=["authorization_bearer", "x_api_key"],
)
def test_a_wrong_key_is_unauthenticated(keyed, headers) -> None:
    pixels = grpc_input("image", "UINT8", GOOD_PIXELS)
    refused = refusal(
        lambda: keyed.client.infer(MODEL, [pixels], headers=headers, client_timeout=CALL_TIMEOUT_S)
    )
    assert refused.status() == status("UNAUTHENTICATED"), refused


# -- the listener -------------------------------------------------------------------------

on_linux = pytest.mark.skipif(
    not Path("/proc/self/net/tcp").is_file(), reason="reads the listening sockets from /proc"
)


@on_linux
def test_grpc_listens_beside_http_on_the_same_host(served, keyed) -> None:
    for server, port in ((served.server, served.grpc_port), (keyed.server, keyed.grpc_port)):
        assert listening(server.process.pid) == {
            (LOOPBACK, http_port(server)),
            (LOOPBACK, port),
        }


@on_linux
def test_without_a_grpc_port_there_is_no_grpc_listener(classifier_dir, tmp_path) -> None:
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1"]
    with running_server(
        flags,
        log_path=tmp_path / "server.log",
        inherit_settings=False,
        memory_limit_bytes=MEMORY_CAP_BYTES,
    ) as server:
        assert listening(server.process.pid) == {(LOOPBACK, http_port(server))}
        with grpc.insecure_channel(
            server.url.removeprefix("http://"), options=CHANNEL_ARGS
        ) as channel:
            ready = grpc.channel_ready_future(channel)
            with pytest.raises(grpc.FutureTimeoutError):  # HTTP/1.1 only: no HTTP/2 peer
                ready.result(timeout=2)


# -- the protocol's definitions -----------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    """protoc's FileDescriptorSet of service/grpc_v2's two protocol files."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path_factory.mktemp("protoc") / DESCRIPTORS
    files = [CONFIG_PROTO, PROTO, HEALTH_PROTO]
    argv = ["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}", *files]
    assert protoc.main(argv) == 0, f"protoc failed on {files} in {PROTO_DIR}"
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@pytest.fixture(scope="module")
def our_pool(compiled) -> descriptor_pool.DescriptorPool:
    """Our files' descriptors, in a private pool: tritonclient registered the same
    "inference.*" names in the default one."""
    pool = descriptor_pool.DescriptorPool()
    for file in compiled.file:
        pool.Add(file)
    return pool


@pytest.fixture(scope="module")
def ours(our_pool):
    return our_pool.FindFileByName(PROTO)


def _messages(descriptors) -> Iterator:
    for message in descriptors:
        yield message
        yield from _messages(message.nested_types)


def _repeated(field) -> bool:
    """protobuf 6's is_repeated (its label is deprecated); older versions' label."""
    return (
        field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    )


def _field(field) -> dict:
    return {
        "number": field.number,
        "type": field.type,
        "repeated": _repeated(field),
        "message_type": field.message_type.full_name if field.message_type else None,
        "enum_type": field.enum_type.full_name if field.enum_type else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
    }


def _assert_fields_are_tritons(ours, triton) -> set[str]:
    """Every message of our file is in tritonclient's, with each of its fields numbered
    and typed as there, and each enum's values as there; the messages' names."""
    assert ours.package == triton.package == "inference"
    theirs = {m.full_name: m for m in _messages(triton.message_types_by_name.values())}
    messages = list(_messages(ours.message_types_by_name.values()))
    names = {m.full_name for m in messages}
    assert names <= theirs.keys(), f"not in tritonclient's proto: {names - theirs.keys()}"
    enums = [*ours.enum_types_by_name.values(), *(e for m in messages for e in m.enum_types)]
    their_enums = {e.full_name: e for e in triton.enum_types_by_name.values()}
    their_enums |= {e.full_name: e for m in theirs.values() for e in m.enum_types}
    for enum in enums:
        values = {v.name: v.number for v in enum.values}
        assert values == {v.name: v.number for v in their_enums[enum.full_name].values}, enum
    for message in messages:
        triton_message = theirs[message.full_name]
        assert message.GetOptions().map_entry == triton_message.GetOptions().map_entry
        for field in message.fields:
            where = f"{message.full_name}.{field.name}"
            assert field.name in triton_message.fields_by_name, f"{where}: not in tritonclient's"
            assert _field(field) == _field(triton_message.fields_by_name[field.name]), where
    return names


def test_our_messages_match_tritonclients_field_by_field(ours) -> None:
    names = _assert_fields_are_tritons(ours, grpcclient.service_pb2.DESCRIPTOR)
    assert {"inference.ModelInferRequest.InferInputTensor", "inference.InferTensorContents",
            "inference.ModelInferResponse.ParametersEntry", "inference.ModelStatistics",
            "inference.InferBatchStatistics"} <= names  # fmt: skip


def test_our_model_configuration_matches_tritonclients_field_by_field(our_pool) -> None:
    ours = our_pool.FindFileByName(CONFIG_PROTO)
    names = _assert_fields_are_tritons(ours, grpcclient.model_config_pb2.DESCRIPTOR)
    assert {"inference.ModelConfig", "inference.ModelInput", "inference.ModelOutput"} <= names


def test_our_rpcs_are_tritonclients(ours) -> None:
    service_descriptor = ours.services_by_name[SERVICE]
    theirs = grpcclient.service_pb2.DESCRIPTOR.services_by_name[SERVICE]
    assert service_descriptor.full_name == theirs.full_name == f"inference.{SERVICE}"
    assert {m.name for m in service_descriptor.methods} == RPCS
    for method in service_descriptor.methods:
        triton_method = theirs.methods_by_name[method.name]
        streaming = method.name == "ModelStreamInfer"  # both ways, as Triton's
        for side in (method, triton_method):
            assert side.client_streaming == side.server_streaming == streaming, side.full_name
        assert (method.input_type.full_name, method.output_type.full_name) == (
            triton_method.input_type.full_name,
            triton_method.output_type.full_name,
        ), method.name


def test_the_committed_descriptors_are_protocs_compilation_of_the_proto(compiled) -> None:
    committed = PROTO_DIR / DESCRIPTORS
    assert committed.is_file(), f"{committed} is missing: python -m service.grpc_v2.generate"
    stored = descriptor_pb2.FileDescriptorSet.FromString(committed.read_bytes())
    assert stored == compiled, f"{committed} is stale: python -m service.grpc_v2.generate"


# -- TLS and the request-body budget --------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A test authority and a certificate for 127.0.0.1 it signed, with its key in the
    same file (the server splits them for gRPC)."""
    trustme = pytest.importorskip("trustme", reason="trustme is in the dev extra")
    folder = tmp_path_factory.mktemp("grpc_pki")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    files = {"ca": folder / "ca.pem", "both": folder / "both.pem"}
    authority.cert_pem.write_to_path(files["ca"])
    issued.private_key_and_cert_chain_pem.write_to_path(files["both"])
    return files


def test_grpc_over_tls_with_the_https_certificate(classifier_dir, tls_files, tmp_path) -> None:
    """With --tls-certfile the gRPC port speaks TLS with the same certificate: a client
    that trusts the authority gets /classify's answer over it, a plaintext one none."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1",
             "--tls-certfile", str(tls_files["both"]), "--grpc-port", str(port)]  # fmt: skip
    with running_server(
        flags,
        log_path=tmp_path / "server.log",
        inherit_settings=False,
        memory_limit_bytes=MEMORY_CAP_BYTES,
        tls_ca_file=tls_files["ca"],
    ) as server:
        secure = grpcclient.InferenceServerClient(
            f"{LOOPBACK}:{port}",
            ssl=True,
            root_certificates=str(tls_files["ca"]),
            channel_args=CHANNEL_ARGS,
        )
        jpeg = encode(GOOD_PIXELS[0], "JPEG")
        answer = grpc_infer(secure, "encoded_image", "BYTES", np.array([jpeg], dtype=object))
        secure.close()
        trusting = ssl.create_default_context(cafile=str(tls_files["ca"]))
        with httpx.Client(base_url=server.url, verify=trusting, timeout=30) as http:
            expected = classify_scores(http, [jpeg])
        np.testing.assert_allclose(answer["probabilities"], expected, rtol=0, atol=1e-6)
        plain = connect(port)
        with pytest.raises(grpcclient.InferenceServerException) as refused:
            plain.get_server_metadata(client_timeout=5)
        plain.close()
        assert refused.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


def upload_held(http_port_: int, declared: int) -> socket.socket:
    """A REST upload that declares `declared` bytes and sends a few: the server reserves
    the declared size in its request-body budget until the connection closes."""
    connection = socket.create_connection((LOOPBACK, http_port_))
    head = (
        f"POST /classify HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    connection.sendall(head.encode() + b"\x89PNG")
    return connection


def held_bytes(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("hornet_upload_buffer_bytes "):
            return float(line.split()[1])
    raise AssertionError("no hornet_upload_buffer_bytes in /metrics")


def test_a_calls_message_counts_in_the_request_body_budget_rest_uploads_share(
    classifier_dir, tmp_path
) -> None:
    """A 1 MB budget held by a REST upload in progress: a gRPC call whose message does not
    fit answers UNAVAILABLE with retry-after, as a REST upload would get 503; once the
    upload is gone the same call is served."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1",
             "--max-upload-mb", "1", "--max-upload-buffer-mb", "1",
             "--grpc-port", str(port)]  # fmt: skip
    pixels = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    png = encode(pixels, "PNG")  # about 360 KB: noise does not compress
    assert 300_000 < len(png) < 500_000
    images = np.array([png], dtype=object)
    with (
        running_server(
            flags,
            log_path=tmp_path / "server.log",
            inherit_settings=False,
            memory_limit_bytes=MEMORY_CAP_BYTES,
        ) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        client = connect(port)
        holder = upload_held(http_port(server), 800_000)
        try:
            assert held_bytes(http) == 800_000
            with pytest.raises(grpcclient.InferenceServerException) as full:
                grpc_infer(client, "encoded_image", "BYTES", images)
            assert full.value.status() == "StatusCode.UNAVAILABLE"
            assert full.value.message().startswith("overloaded:")
        finally:
            holder.close()
        for _ in range(100):
            if held_bytes(http) == 0:
                break
            time.sleep(0.05)
        answer = grpc_infer(client, "encoded_image", "BYTES", images)
        client.close()
        np.testing.assert_allclose(
            answer["probabilities"], classify_scores(http, [png]), rtol=0, atol=1e-6
        )
        assert held_bytes(http) == 0


def test_a_503_carries_retry_after_in_the_trailing_metadata(classifier_dir, tmp_path) -> None:
    """UNAVAILABLE from a full budget, read through a raw stub: `retry-after: 1` in the
    trailing metadata, as the REST 503's Retry-After header."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1",
             "--max-upload-mb", "1", "--max-upload-buffer-mb", "1",
             "--grpc-port", str(port)]  # fmt: skip
    with running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as server:
        holder = upload_held(http_port(server), 1_000_000)
        try:
            with grpc.insecure_channel(f"{LOOPBACK}:{port}", options=CHANNEL_ARGS) as channel:
                stub = grpcclient.service_pb2_grpc.GRPCInferenceServiceStub(channel)
                request = grpcclient.service_pb2.ModelInferRequest(model_name=MODEL)
                request.inputs.add(name="encoded_image", datatype="BYTES", shape=[1])
                request.inputs[0].contents.bytes_contents.append(b"x" * 100_000)
                with pytest.raises(grpc.RpcError) as full:
                    stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        finally:
            holder.close()
        assert full.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ("retry-after", "1") in tuple(full.value.trailing_metadata())


def test_the_request_id_comes_back_in_the_trailing_metadata(served) -> None:
    """A valid x-request-id sent is the one returned (after an answer and after an
    error); without one, or with one the REST routes would not keep, the server's own."""
    request = grpcclient.service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="UINT8", shape=list(GOOD_PIXELS.shape))
    request.raw_input_contents.append(GOOD_PIXELS.tobytes())
    _, call = served.stub.ModelInfer.with_call(
        request, metadata=(("x-request-id", "trace-42.a"),), timeout=CALL_TIMEOUT_S
    )
    assert ("x-request-id", "trace-42.a") in tuple(call.trailing_metadata())
    for sent in ((), (("x-request-id", "not valid!"),)):
        _, call = served.stub.ModelInfer.with_call(request, metadata=sent, timeout=CALL_TIMEOUT_S)
        (given,) = [v for k, v in call.trailing_metadata() if k == "x-request-id"]
        assert len(given) == 32 and int(given, 16) >= 0
    unknown = grpcclient.service_pb2.ModelInferRequest(model_name="no-such-model")
    with pytest.raises(grpc.RpcError) as failed:
        served.stub.ModelInfer(
            unknown, metadata=(("x-request-id", "trace-43"),), timeout=CALL_TIMEOUT_S
        )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "trace-43") in tuple(failed.value.trailing_metadata())


# -- gRPC health checking ------------------------------------------------------------------


def health_check(port: int, service: str, metadata: tuple = ()) -> bytes:
    """grpc.health.v1.Health/Check, the request and answer as wire bytes (written from the
    protocol's published definition: `service` is field 1, a string; `status` field 1, an
    enum with SERVING = 1), so that the test shares nothing with the server's .proto."""
    encoded = service.encode()
    request = b"\x0a" + bytes([len(encoded)]) + encoded if encoded else b""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}", options=CHANNEL_ARGS) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        return check(request, metadata=metadata, timeout=CALL_TIMEOUT_S)


def test_grpc_health_checking_answers_serving_for_the_server_and_its_service(served) -> None:
    assert health_check(served.grpc_port, "") == b"\x08\x01"  # SERVING
    assert health_check(served.grpc_port, "inference.GRPCInferenceService") == b"\x08\x01"
    with pytest.raises(grpc.RpcError) as unknown:
        health_check(served.grpc_port, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_health_checking_needs_no_key_as_the_other_probes(keyed) -> None:
    assert health_check(keyed.grpc_port, "") == b"\x08\x01"
    with grpc.insecure_channel(f"{LOOPBACK}:{keyed.grpc_port}", options=CHANNEL_ARGS) as channel:
        watch = health_watch(channel, "")
        assert next(watch) == b"\x08\x01"
        watch.cancel()


def health_watch(channel: grpc.Channel, service: str) -> grpc.Future:
    """grpc.health.v1.Health/Watch on `channel`: its stream of answers as wire bytes (the
    request as `health_check` writes it)."""
    encoded = service.encode()
    request = b"\x0a" + bytes([len(encoded)]) + encoded if encoded else b""
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
    return watch(request, timeout=CALL_TIMEOUT_S)


def test_a_health_watch_says_the_status_and_an_unknown_service_stays_open(served) -> None:
    """Watch sends Check's status at once (SERVING); for an unknown service it sends
    SERVICE_UNKNOWN and keeps the call open, as the protocol asks; watchers take stream
    slots, so one past the cap is refused."""
    from service.grpc_v2.server import concurrent_streams
    from service.settings import Settings

    cap = concurrent_streams(Settings(max_upload_mb=UPLOAD_LIMIT_MB))
    with grpc.insecure_channel(f"{LOOPBACK}:{served.grpc_port}", options=CHANNEL_ARGS) as channel:
        watches = [health_watch(channel, "") for _ in range(cap - 1)]
        watches.append(health_watch(channel, "no.such.Service"))
        try:
            assert [next(w) for w in watches] == [b"\x08\x01"] * (cap - 1) + [b"\x08\x03"]
            with pytest.raises(grpc.RpcError) as refused:
                next(health_watch(channel, ""))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert health_check(served.grpc_port, "") == b"\x08\x01"  # unary: served
        finally:
            for watch in watches:
                watch.cancel()
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:  # the cancelled watches' slots come free
            try:
                assert next(health_watch(channel, "")) == b"\x08\x01"
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the stream slots never came free"
                time.sleep(0.1)


def test_open_streams_end_when_the_server_drains_and_do_not_hold_its_exit(
    classifier_dir, tmp_path
) -> None:
    """SIGTERM with a health Watch and an idle ModelStreamInfer open: the watch says
    NOT_SERVING and ends, the stream ends (OK) after its answered request, and the server
    exits 0 well before --drain-timeout-s (20 s), which gRPC's stop would otherwise wait
    out for calls that never end by themselves."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1",
             "--drain-timeout-s", "20", "--grpc-port", str(port)]  # fmt: skip
    with (
        running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s,
        grpc.insecure_channel(f"{LOOPBACK}:{port}", options=CHANNEL_ARGS) as channel,
    ):
        watch = health_watch(channel, "")
        assert next(watch) == b"\x08\x01"
        idle = threading.Event()

        def one_then_idle() -> Iterator[object]:
            yield pixel_request("before")
            idle.wait(CALL_TIMEOUT_S)

        stream = stream_call(channel)(one_then_idle(), timeout=CALL_TIMEOUT_S)
        assert next(stream).infer_response.id == "before"
        signalled = time.monotonic()
        s.process.send_signal(signal.SIGTERM)
        assert list(watch) == [b"\x08\x02"]  # NOT_SERVING, then the end (OK)
        assert list(stream) == []
        assert s.process.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 10
        idle.set()


def test_a_server_whose_models_do_not_load_is_live_but_not_serving(
    classifier_dir, tmp_path
) -> None:
    """A model that cannot load (--engine tensorrt here, kept up by
    --no-exit-on-load-error): over gRPC the server is live, not ready, NOT_SERVING to
    health checks, and inference is UNAVAILABLE, as /readyz and the REST routes say."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine", "tensorrt",
             "--no-exit-on-load-error", "--grpc-port", str(port)]  # fmt: skip
    with running_server(
        flags, log_path=tmp_path / "server.log", inherit_settings=False, ready_path="/healthz"
    ) as server:
        deadline = time.monotonic() + 60
        while "EngineUnavailable" not in httpx.get(f"{server.url}/readyz").text:
            assert time.monotonic() < deadline, "/readyz never named the load error"
            time.sleep(0.2)
        assert health_check(port, "") == b"\x08\x02"  # NOT_SERVING
        client = connect(port)
        assert client.is_server_live() and not client.is_server_ready()
        with pytest.raises(grpcclient.InferenceServerException) as refused:
            grpc_infer(client, "image", "UINT8", GOOD_PIXELS)
        client.close()
        assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_listed_elements_past_the_limit_are_refused_before_conversion(
    classifier_dir, tmp_path
) -> None:
    """--max-listed-elements 1000: one image (150,528 elements) as gRPC typed contents is
    refused (RESOURCE_EXHAUSTED naming raw_input_contents), as JSON data over REST (413
    naming the binary extension); the same image raw over gRPC is served."""
    port = free_port()
    flags = ["--model-dir", str(classifier_dir), "--engine-threads", "1",
             "--max-listed-elements", "1000", "--grpc-port", str(port)]  # fmt: skip
    with (
        running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s,
        httpx.Client(base_url=s.url, timeout=30) as http,
        grpc.insecure_channel(f"{LOOPBACK}:{port}", options=CHANNEL_ARGS) as channel,
        connect(port) as client,
    ):
        stub = grpcclient.service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = grpcclient.service_pb2.ModelInferRequest(model_name=MODEL)
        tensor = typed.inputs.add(name="image", datatype="UINT8", shape=list(GOOD_PIXELS.shape))
        tensor.contents.uint_contents.extend(GOOD_PIXELS.reshape(-1).tolist())
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(typed, timeout=CALL_TIMEOUT_S)
        rest = http.post(
            f"/v2/models/{MODEL}/infer",
            json={"inputs": [{"name": "image", "datatype": "UINT8",
                              "shape": list(GOOD_PIXELS.shape),
                              "data": GOOD_PIXELS.reshape(-1).tolist()}]},
        )  # fmt: skip
        raw = grpc_infer(client, "image", "UINT8", GOOD_PIXELS)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "150528 elements" in refused.value.details()
    assert "raw_input_contents" in refused.value.details()
    assert rest.status_code == 413 and "binary tensor extension" in rest.json()["error"]
    assert raw["probabilities"].shape == (1, 10)


def test_an_error_quoting_a_huge_model_name_keeps_its_status(served) -> None:
    """A megabyte of model name: NOT_FOUND with the start of the usual sentence, its
    details bounded (clients refuse trailers past 8 KiB: unbounded, the call ended in
    RESOURCE_EXHAUSTED "Stream removed" instead), on every call that names a model."""
    pb = grpcclient.service_pb2
    name = "x" * 1_000_000
    for rpc, request in (
        ("ModelMetadata", pb.ModelMetadataRequest(name=name)),
        ("ModelConfig", pb.ModelConfigRequest(name=name)),
        ("ModelStatistics", pb.ModelStatisticsRequest(name=name)),
        ("ModelReady", pb.ModelReadyRequest(name=name)),
        ("ModelInfer", pb.ModelInferRequest(model_name=name)),
    ):
        with pytest.raises(grpc.RpcError) as failed:
            getattr(served.stub, rpc)(request, timeout=CALL_TIMEOUT_S)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND, (rpc, failed.value.details())
        details = failed.value.details()
        assert details.startswith("unknown_model: no model named 'xxx") and len(details) < 2100
    assert served.client.is_server_live()


# -- streaming inference (ModelStreamInfer) -------------------------------------------------


class Collected:
    """A tritonclient stream callback keeping (result, error) pairs as they come."""

    def __init__(self) -> None:
        self.answers: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.answers.put((result, error))

    def take(self, count: int) -> list[tuple]:
        return [self.answers.get(timeout=CALL_TIMEOUT_S) for _ in range(count)]


def test_a_stream_answers_each_request_as_model_infer_does(served, photos) -> None:
    """tritonclient's streaming API: twelve photos sent on one stream, with an unknown
    model's request among them, come back one answer each, by request id, equal to
    ModelInfer's; the bad one is an error naming the model, and the stream goes on."""
    jpegs = {name: np.array([encode(photos[name], "JPEG")], dtype=object) for name in NAMES}
    expected = {
        name: grpc_infer(served.client, "encoded_image", "BYTES", jpeg)["probabilities"]
        for name, jpeg in jpegs.items()
    }
    sent = [(f"req-{i}", NAMES[i % len(NAMES)]) for i in range(12)]
    collected = Collected()
    client = connect(served.grpc_port)
    client.start_stream(callback=collected)
    try:
        for number, (request_id, name) in enumerate(sent):
            tensor = grpc_input("encoded_image", "BYTES", jpegs[name])
            client.async_stream_infer(MODEL, [tensor], request_id=request_id)
            if number == 5:
                pixels = grpc_input("image", "UINT8", GOOD_PIXELS)
                client.async_stream_infer("nope", [pixels], request_id="bad")
        answers = collected.take(len(sent) + 1)
    finally:
        client.stop_stream()
        client.close()
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1, errors
    assert errors[0].message().startswith("unknown_model: no model named 'nope'"), errors[0]
    results = {result.get_response().id: result for result, error in answers if error is None}
    assert set(results) == {request_id for request_id, _ in sent}
    for request_id, name in sent:
        got = results[request_id].as_numpy("probabilities")
        np.testing.assert_allclose(got, expected[name], rtol=0, atol=1e-6)
    assert_still_serving(served)


def stream_call(channel: grpc.Channel) -> Callable:
    """ModelStreamInfer on `channel`, with tritonclient's message classes."""
    pb = grpcclient.service_pb2
    return channel.stream_stream(
        f"/inference.{SERVICE}/ModelStreamInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )


def pixel_request(request_id: str) -> object:
    pb = grpcclient.service_pb2
    request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name="image", datatype="UINT8", shape=list(GOOD_PIXELS.shape))
    request.raw_input_contents.append(GOOD_PIXELS.tobytes())
    return request


def test_open_streams_are_capped_and_leave_room_for_unary_calls(served) -> None:
    """An open stream holds one of the server's concurrent-call slots (16 with a 1 MB
    upload limit) even while idle: at most half of them are streams. The next stream is
    refused at once (RESOURCE_EXHAUSTED, saying why) while unary calls are still served;
    once one closes, a new stream is served."""
    from service.grpc_v2.server import concurrent_streams
    from service.settings import Settings

    cap = concurrent_streams(Settings(max_upload_mb=UPLOAD_LIMIT_MB))
    assert cap == 8
    release = threading.Event()

    def idle_after_one(request_id: str) -> Iterator[object]:
        yield pixel_request(request_id)
        release.wait(CALL_TIMEOUT_S)

    with grpc.insecure_channel(f"{LOOPBACK}:{served.grpc_port}", options=CHANNEL_ARGS) as channel:
        call = stream_call(channel)
        streams = [call(idle_after_one(f"s{i}"), timeout=CALL_TIMEOUT_S) for i in range(cap)]
        try:
            for number, stream in enumerate(streams):  # each one open and answered once
                first = next(stream)
                assert first.error_message == "" and first.infer_response.id == f"s{number}"
            extra = call(iter([pixel_request("extra")]), timeout=CALL_TIMEOUT_S)
            with pytest.raises(grpc.RpcError) as refused:
                list(extra)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"overloaded: {cap} streams are open" in refused.value.details()
            assert_still_serving(served)  # a unary call while every stream slot is taken
        finally:
            release.set()
        for stream in streams:
            assert list(stream) == []  # each ended cleanly once its client stopped sending
        again = list(call(iter([pixel_request("again")]), timeout=CALL_TIMEOUT_S))
        assert [a.infer_response.id for a in again] == ["again"]


def test_a_stream_holds_a_bounded_number_of_requests_at_once() -> None:
    """One stream's requests are read only while fewer than STREAM_IN_FLIGHT of them are
    being answered or waiting to be written: 40 sent to an engine that does not finish
    are read 16 at a time; once it finishes, every one is answered, once."""
    from service.auth import KeyRing
    from service.grpc_v2 import server as grpc_server
    from service.metrics import ServiceMetrics
    from service.middleware import UploadBuffer
    from service.settings import Settings

    pb = grpc_server.MESSAGES

    class Stuck:
        pool = types.SimpleNamespace(draining=False)

        def __init__(self) -> None:
            self.go = asyncio.Event()

        async def ModelInfer(self, request, context):
            await self.go.wait()
            return pb["ModelInferResponse"](model_name=request.model_name, id=request.id)

    async def scenario() -> tuple[int, list[str]]:
        service = Stuck()
        calls = grpc_server._Calls(
            service, Settings(), ServiceMetrics(), UploadBuffer(1 << 30), KeyRing([])
        )
        pulled = 0

        class Context:  # what the stream reads its messages with
            async def read(self):
                nonlocal pulled
                if pulled == 40:
                    return grpc.aio.EOF
                pulled += 1
                return pb["ModelInferRequest"](model_name=MODEL, id=str(pulled - 1))

        stream = grpc_server._Stream()
        answers = calls._answered(None, context=Context(), stream=stream, route="/stream")
        first = asyncio.ensure_future(anext(answers))
        await asyncio.sleep(0.2)  # the engine is stuck: the reading stops at the bound
        held = pulled
        assert stream.held == held  # not idle: no new stream may take its place
        service.go.set()
        ids = [(await first).infer_response.id] + [a.infer_response.id async for a in answers]
        assert stream.held == 0
        return held, ids

    held, ids = asyncio.run(scenario())
    assert held == grpc_server.STREAM_IN_FLIGHT == 16
    assert sorted(ids, key=int) == [str(n) for n in range(40)]


def test_a_stream_needs_a_key_as_every_call_does(keyed) -> None:
    """A stream's key is checked at its start: without one it ends UNAUTHENTICATED before
    any request is answered; with one (in the stream's metadata) it is served."""
    for headers, expected in ((None, "UNAUTHENTICATED"), ({"x-api-key": KEY}, None)):
        collected = Collected()
        client = connect(keyed.grpc_port)
        client.start_stream(callback=collected, headers=headers)
        try:
            pixels = grpc_input("image", "UINT8", GOOD_PIXELS)
            try:
                client.async_stream_infer(MODEL, [pixels], request_id="one")
            except grpcclient.InferenceServerException:
                # the refusal came first: tritonclient then refuses to send, and has
                # given the refusal to the callback
                assert expected is not None
            ((result, error),) = collected.take(1)
        finally:
            client.stop_stream()
            client.close()
        if expected is None:
            assert error is None and result.get_response().id == "one"
            assert result.as_numpy("probabilities").shape == (1, 10)
        else:
            assert result is None and error.status() == status(expected), error


def test_a_message_protobuf_cannot_parse_is_a_bad_request_and_a_stream_goes_on(
    served,
) -> None:
    """Bytes that gRPC frames but that are no message of the method's type: a unary call
    ends INVALID_ARGUMENT `bad_request` naming the type; on a stream such a message gets
    an error answer of its own and the requests after it are answered. Before: INTERNAL
    `internal_error: DecodeError` with an error line and its traceback in the log for
    each, and on a stream UNKNOWN, or (with the call's request iterator, which ends at
    such a message) the requests after it unanswered under an OK status."""
    messages = grpcclient.service_pb2
    log_before = served.server.log_path.read_text().count('"level": "error"')
    with grpc.insecure_channel(f"{LOOPBACK}:{served.grpc_port}") as channel:
        for method in ("ModelInfer", "ModelMetadata"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as raised:
                call(b"\xff\xff\xff", timeout=CALL_TIMEOUT_S)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details().startswith(
                f"bad_request: the request is not a valid {method}Request message"
            )
        good = []
        for number in range(3):
            request = messages.ModelInferRequest(model_name=MODEL, id=f"good-{number}")
            request.inputs.add(name="image", datatype="UINT8", shape=list(GOOD_PIXELS.shape))
            request.raw_input_contents.append(GOOD_PIXELS.tobytes())
            good.append(request.SerializeToString())
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        sent = [good[0], b"\xff\xff\xff", good[1], b"\x0a", good[2]]
        answers = stream(iter(sent), timeout=CALL_TIMEOUT_S)
        parsed = [messages.ModelStreamInferResponse.FromString(answer) for answer in answers]
        assert answers.code() == grpc.StatusCode.OK
    answered = sorted(a.infer_response.id for a in parsed if not a.error_message)
    assert answered == ["good-0", "good-1", "good-2"]
    errors = [a.error_message for a in parsed if a.error_message]
    assert len(errors) == 2
    assert all("not a valid ModelInferRequest message" in error for error in errors)
    assert_still_serving(served)
    time.sleep(0.5)  # the log's writer thread has written what came before
    # a client's malformed bytes are no error of the server's
    assert served.server.log_path.read_text().count('"level": "error"') == log_before
