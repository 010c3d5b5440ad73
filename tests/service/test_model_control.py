"""Explicit model control (`--model-control-mode explicit`, Triton's): models load, reload
and unload while a real server runs, through tritonclient's own `load_model` and
`unload_model` over REST and gRPC. A reload swaps the new bundle in only once it is
verified and warm, and an unload or reload answers the requests that hold the model
(checked with an upload held open across it); every refusal is a 4xx with its reason."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.testing import LOOPBACK, free_port, running_server
from tests.helpers import bundles
from tests.helpers.images import encode, upload
from tests.helpers.waiting import wait_until

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TIMEOUT_S = 60


def _repository(tmp_path: Path) -> Path:
    repository = tmp_path / "repository"
    bundles.write_classifier(repository / "classifier")
    bundles.write_segmenter(repository / "segmenter")
    return repository


def _reverse_labels(bundle: Path) -> list[str]:
    """The bundle's labels reversed in its manifest (its graph unchanged): a new version
    whose answers name other classes, so which version answered shows."""
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["labels"] = manifest["labels"][::-1]
    manifest_path.write_text(json.dumps(manifest))
    return manifest["labels"]


def _index(url: str, key: str | None = None) -> dict[str, tuple[str, str]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    entries = httpx.post(f"{url}/v2/repository/index", headers=headers, timeout=TIMEOUT_S)
    return {e["name"]: (e["state"], e.get("reason", "")) for e in entries.json()}


def _photo() -> bytes:
    rng = np.random.default_rng(3)
    return encode(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "PNG")


def _top_label(url: str, image: bytes) -> str:
    answer = httpx.post(f"{url}/classify", files=upload(image), timeout=TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["top_k"][0]["label"]


class HeldUpload:
    """A /classify request whose body is sent in two parts: the model is found and held
    (ModelRunner.in_use) when the head arrives, and answered once the rest is sent."""

    def __init__(self, url: str, image: bytes) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        self.body = image
        head = (
            f"POST /classify?model=tiny_cls HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {len(image)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + image[:10])

    def finish(self) -> tuple[int, dict]:
        self.sock.sendall(self.body[10:])
        received = b""
        while b"\r\n\r\n" not in received or len(received) < self._length(received):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            received += chunk
        self.sock.close()
        head, _, body = received.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    @staticmethod
    def _length(received: bytes) -> int:
        head, _, _ = received.partition(b"\r\n\r\n")
        found = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        return len(head) + 4 + int(found.group(1)) if found else 1 << 30


def test_models_load_reload_and_unload_while_the_server_serves(tmp_path) -> None:
    repository = _repository(tmp_path)
    grpc_port = free_port()
    flags = ["--model-repository", str(repository), "--model-control-mode", "explicit",
             "--load-model", "tiny_cls", "--engine-threads", "1",
             "--grpc-port", str(grpc_port)]  # fmt: skip
    image = _photo()
    with running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s:
        rest = httpclient.InferenceServerClient(s.url.removeprefix("http://"))
        rpc = grpcclient.InferenceServerClient(f"{LOOPBACK}:{grpc_port}")
        # at start: only what --load-model names; the other is listed, not loaded
        assert _index(s.url) == {
            "tiny_cls": ("READY", ""),
            "tiny_seg": ("UNAVAILABLE", "not loaded"),
        }
        assert httpx.post(f"{s.url}/segment", files=upload(image)).status_code == 404
        assert "model_repository" in rest.get_server_metadata()["extensions"]

        # load over REST (tritonclient.http): served at once, the server ready throughout
        rest.load_model("tiny_seg")
        assert _index(s.url)["tiny_seg"] == ("READY", "")
        assert rest.is_model_ready("tiny_seg") and rest.is_server_ready()
        segmented = httpx.post(f"{s.url}/segment", files=upload(image), timeout=TIMEOUT_S)
        assert segmented.status_code == 200, segmented.text

        # reload a new version while a request holds the old one
        before = _top_label(s.url, image)
        held = HeldUpload(s.url, image)
        wait_until(lambda: _holding(s.url), TIMEOUT_S)
        reversed_labels = _reverse_labels(repository / "classifier")
        rest.load_model("tiny_cls")  # returns once the new version serves
        after = _top_label(s.url, image)
        original = reversed_labels[::-1]
        assert after == reversed_labels[original.index(before)] != before
        # a next reload waits for the old version's retirement (never three versions)
        again = threading.Thread(
            target=httpx.post, args=(f"{s.url}/v2/repository/models/tiny_cls/load",),
            kwargs={"timeout": TIMEOUT_S},
        )  # fmt: skip
        again.start()
        time.sleep(0.5)
        assert again.is_alive()
        status, answer = held.finish()  # answered by the version it was sent to
        assert status == 200, answer
        assert answer["results"][0]["top_k"][0]["label"] == before
        again.join(TIMEOUT_S)
        assert not again.is_alive()
        assert _top_label(s.url, image) == after

        # unload over gRPC (tritonclient.grpc) while a request holds the model: the
        # unload waits for it, a request arriving meanwhile is 404
        held = HeldUpload(s.url, image)
        wait_until(lambda: _holding(s.url), TIMEOUT_S)
        unloaded = threading.Thread(target=rpc.unload_model, args=("tiny_cls",))
        unloaded.start()
        wait_until(lambda: _index(s.url)["tiny_cls"][1] == "unloaded", TIMEOUT_S)
        late = httpx.post(
            f"{s.url}/classify?model=tiny_cls", files=upload(image), timeout=TIMEOUT_S
        )
        assert late.status_code == 404, late.text
        assert "no model named 'tiny_cls'" in late.json()["detail"]
        assert unloaded.is_alive()  # still waiting for the held request
        status, answer = held.finish()
        assert status == 200, answer
        unloaded.join(TIMEOUT_S)
        assert not unloaded.is_alive()
        assert not _loaded(rpc, "tiny_cls")
        assert _index(s.url)["tiny_cls"] == ("UNAVAILABLE", "unloaded")
        assert [m["name"] for m in httpx.get(f"{s.url}/v1/models").json()["models"]] == ["tiny_seg"]
        rest.unload_model("tiny_cls")  # not loaded: nothing to do

        # and back over gRPC
        rpc.load_model("tiny_cls")
        assert _top_label(s.url, image) == after
        rest.close()
        rpc.close()
    log = (tmp_path / "server.log").read_text()
    assert log.count('"message": "model retired"') == 3  # two old versions, then the unload
    assert "--model-control-mode explicit without API keys: any client" in log


def _holding(url: str) -> bool:
    """Whether a request besides this scrape is in the server (the held upload)."""
    metrics = httpx.get(f"{url}/metrics", timeout=TIMEOUT_S).text
    found = re.search(r"^hornet_in_flight_requests (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) >= 2  # this scrape is one


def _loaded(client, name: str) -> bool:
    try:
        client.get_model_metadata(name)
    except InferenceServerException:
        return False
    return True


def test_a_version_that_does_not_load_leaves_the_one_in_service(tmp_path) -> None:
    repository = _repository(tmp_path)
    flags = ["--model-repository", str(repository), "--model-control-mode", "explicit",
             "--load-model", "tiny_cls", "--engine-threads", "1"]  # fmt: skip
    image = _photo()
    with running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s:
        before = _top_label(s.url, image)
        # a new version whose graph no longer matches the digest its manifest records
        graph = next((repository / "classifier").glob("*.onnx"))
        graph.write_bytes(graph.read_bytes() + b"\0")
        failed = httpx.post(f"{s.url}/v2/repository/models/tiny_cls/load", timeout=TIMEOUT_S)
        assert failed.status_code == 400, failed.text
        error = failed.json()["error"]
        assert error.startswith("load_failed: model 'tiny_cls' did not load: ")
        assert f"{graph.name}: " in error and "the file was modified" in error
        state, reason = _index(s.url)["tiny_cls"]  # the old version still serves
        assert state == "READY" and reason.startswith(
            "serving the version loaded before: a new one did not load: "
        )
        assert "the file was modified" in reason
        assert _top_label(s.url, image) == before
        # a model never loaded whose load fails is listed with the reason
        (repository / "segmenter" / "model.onnx").unlink()
        failed = httpx.post(f"{s.url}/v2/repository/models/tiny_seg/load", timeout=TIMEOUT_S)
        assert failed.status_code == 400, failed.text
        state, reason = _index(s.url)["tiny_seg"]
        assert state == "UNAVAILABLE" and "model.onnx" in reason
        assert httpx.get(f"{s.url}/readyz").status_code == 200  # the server stays ready
        metrics = httpx.get(f"{s.url}/metrics").text
        for model in ("tiny_cls", "tiny_seg"):
            line = (
                f'hornet_model_control_total{{action="load",model="{model}",outcome="failure"}} 1.0'
            )
            assert line in metrics, metrics[-3000:]


def test_load_and_unload_refuse_what_they_do_not_take(tmp_path, classifier_dir) -> None:
    grpc_port = free_port()
    repository = _repository(tmp_path)
    explicit = ["--model-repository", str(repository), "--model-control-mode", "explicit",
                "--engine-threads", "1", "--grpc-port", str(grpc_port)]  # fmt: skip
    with running_server(explicit, inherit_settings=False) as s:
        assert _index(s.url) == {  # nothing named: an empty server, ready
            "tiny_cls": ("UNAVAILABLE", "not loaded"),
            "tiny_seg": ("UNAVAILABLE", "not loaded"),
        }
        assert httpx.get(f"{s.url}/readyz").status_code == 200
        load = f"{s.url}/v2/repository/models/tiny_cls/load"
        cases = [  # (body, status, the error's start)
            (b'{"parameters": {"config": "{}"}}', 422, "invalid_parameters: "),
            (b'{"parameters": {"file:1/model.onnx": "AAAA"}}', 422, "invalid_parameters: "),
            (b'{"parameters": 3}', 422, "invalid_parameters: "),
            (b"[1]", 422, "invalid_parameters: "),
            (b"{", 422, "invalid_parameters: "),
            (b" " * 5000, 413, "payload_too_large: "),
        ]
        for body, status, start in cases:
            answer = httpx.post(load, content=body, timeout=TIMEOUT_S)
            assert answer.status_code == status, (body[:40], answer.text)
            assert answer.json()["error"].startswith(start)
        unload = f"{s.url}/v2/repository/models/tiny_cls/unload"
        wrong = httpx.post(unload, json={"parameters": {"unload_dependents": "yes"}})
        assert wrong.status_code == 422, wrong.text
        missing = httpx.post(f"{s.url}/v2/repository/models/nope/load", timeout=TIMEOUT_S)
        assert missing.status_code == 404
        assert missing.json()["error"].startswith("unknown_model: ")
        assert httpx.post(f"{s.url}/v2/repository/models/nope/unload").status_code == 404

        rpc = grpcclient.InferenceServerClient(f"{LOOPBACK}:{grpc_port}")
        with pytest.raises(InferenceServerException) as refused:
            rpc.load_model("tiny_cls", config="{}")
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'config'" in refused.value.message()
        with pytest.raises(InferenceServerException) as refused:
            rpc.load_model("nope")
        assert refused.value.status() == "StatusCode.NOT_FOUND"
        stub = grpcclient.service_pb2_grpc.GRPCInferenceServiceStub(rpc._channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RepositoryModelLoad(
                grpcclient.service_pb2.RepositoryModelLoadRequest(
                    repository_name="models", model_name="tiny_cls"
                ),
                timeout=TIMEOUT_S,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        rpc.load_model("tiny_cls")  # after all that, a plain load works
        assert _index(s.url)["tiny_cls"] == ("READY", "")
        rpc.close()

    # without --model-control-mode explicit: models stay as they started
    plain = ["--model-dir", str(classifier_dir), "--grpc-port", str(grpc_port)]
    with running_server(plain, inherit_settings=False) as s:
        for action in ("load", "unload"):
            answer = httpx.post(f"{s.url}/v2/repository/models/tiny_cls/{action}")
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"].startswith(
                "model_control_off: models load at start and stay loaded on this server"
            )
        rpc = grpcclient.InferenceServerClient(f"{LOOPBACK}:{grpc_port}")
        with pytest.raises(InferenceServerException) as refused:
            rpc.unload_model("tiny_cls")
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "--model-control-mode explicit" in refused.value.message()
        assert rpc.is_model_ready("tiny_cls")
        rpc.close()


def test_load_and_unload_need_a_key_where_keys_are_set(tmp_path) -> None:
    repository = _repository(tmp_path)
    keys = tmp_path / "keys"
    keys.write_text("control-key-0123456789\n")
    flags = ["--model-repository", str(repository), "--model-control-mode", "explicit",
             "--api-key-file", str(keys), "--engine-threads", "1"]  # fmt: skip
    log = tmp_path / "server.log"
    with running_server(flags, log_path=log, inherit_settings=False) as s:
        load = f"{s.url}/v2/repository/models/tiny_cls/load"
        assert httpx.post(load).status_code == 401
        assert httpx.post(load, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert _index(s.url, "control-key-0123456789")["tiny_cls"][0] == "UNAVAILABLE"
        done = httpx.post(
            load, headers={"Authorization": "Bearer control-key-0123456789"}, timeout=TIMEOUT_S
        )
        assert done.status_code == 200, done.text
        assert _index(s.url, "control-key-0123456789")["tiny_cls"][0] == "READY"
    assert "without API keys" not in log.read_text()
    assert "control-key-0123456789" not in log.read_text()


def test_a_model_added_to_the_repository_later_loads_and_reloads_keep_no_old_version(
    tmp_path,
) -> None:
    repository = tmp_path / "repository"
    repository.mkdir()
    flags = ["--model-repository", str(repository), "--model-control-mode", "explicit",
             "--engine-threads", "1", "--max-batch-size", "2"]  # fmt: skip
    image = _photo()
    with running_server(
        flags, log_path=tmp_path / "server.log", inherit_settings=False,
        memory_limit_bytes=4 << 30,
    ) as s:  # fmt: skip
        assert _index(s.url) == {}  # an empty repository: ready, nothing to serve
        _write_heavy_classifier(repository / "classifier")  # copied in while it runs
        assert _index(s.url) == {"tiny_cls": ("UNAVAILABLE", "not loaded")}
        load = f"{s.url}/v2/repository/models/tiny_cls/load"
        assert httpx.post(load, timeout=TIMEOUT_S).status_code == 200
        label = _top_label(s.url, image)

        def resident_mib() -> int:
            status = Path(f"/proc/{s.process.pid}/status").read_text()
            return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) >> 10

        for _ in range(3):  # settle: the first reloads grow caches and pools
            assert httpx.post(load, timeout=TIMEOUT_S).status_code == 200
            assert _top_label(s.url, image) == label
        wait_until(lambda: _retired(tmp_path / "server.log") == 3, TIMEOUT_S)
        rss = resident_mib()
        for _ in range(8):
            assert httpx.post(load, timeout=TIMEOUT_S).status_code == 200
            assert _top_label(s.url, image) == label
        wait_until(lambda: _retired(tmp_path / "server.log") == 11, TIMEOUT_S)
        time.sleep(1.0)  # the memory releaser's trim
        rss_after = resident_mib()
        # each reload frees the old version at once: the eight retired would hold over
        # 600 MiB, and freed only by Python's cyclic collections they held +32 MiB here
        # (60 reloads: 235 -> 386 MiB, falling back at times); now flat (60: 235 -> 237)
        assert rss_after - rss < HEAVY_MIB / 4, (rss, rss_after)
        shutil.rmtree(repository / "classifier")  # gone from the repository, still served
        unloaded = httpx.post(f"{s.url}/v2/repository/models/tiny_cls/unload")
        assert unloaded.status_code == 200, unloaded.text
        assert _index(s.url) == {}


HEAVY_MIB = 76  # the weights _write_heavy_classifier adds: 18 x 2**20 floats


def _write_heavy_classifier(directory: Path) -> Path:
    """The test classifier with 72 MiB more weights on its answer's path (two
    MatMuls added to its logits), so that an engine left open after a reload shows in
    the server's resident memory."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(bundles.classifier_onnx(224))
    rng = np.random.default_rng(5)
    hidden = 1 << 20
    graph = model.graph
    for node in graph.node:
        if node.output[0] == "logits":
            node.output[0] = "plain_logits"
    graph.initializer.extend(
        [
            numpy_helper.from_array(rng.normal(0, 0.01, (8, hidden)).astype(np.float32), "heavy_a"),
            numpy_helper.from_array(
                rng.normal(0, 0.01, (hidden, bundles.NUM_CLASSES)).astype(np.float32), "heavy_b"
            ),
        ]
    )
    graph.node.extend([
        helper.make_node("MatMul", ["flat", "heavy_a"], ["wide"]),
        helper.make_node("MatMul", ["wide", "heavy_b"], ["extra"]),
        helper.make_node("Add", ["plain_logits", "extra"], ["logits"]),
    ])  # fmt: skip
    size = 224
    return bundles.write_bundle(
        directory,
        name="tiny_cls",
        task="classify",
        onnx_bytes=model.SerializeToString(),
        preprocess=bundles.classify_preprocess(size, True),
        labels=bundles.LABELS,
        inputs=[{"name": "image", "dtype": "uint8", "shape": [-1, size, size, 3],
                 "layout": "NHWC"}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": [-1, bundles.NUM_CLASSES]}],
    )  # fmt: skip


def _retired(log: Path) -> int:
    return log.read_text().count('"message": "model retired"')


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--load-model", "tiny_cls"], "load_model names the repository's models to load"),
        (["--model-control-mode", "explicit", "--load-model", "nope"],
         "--load-model names 'nope': no bundle is of that model (bundles: tiny_cls, tiny_seg)"),
    ],
)  # fmt: skip
def test_start_refuses_load_model_it_cannot_honour(tmp_path, flags, said) -> None:
    import subprocess
    import sys

    repository = _repository(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repository", str(repository), *flags,
         "--check"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert said in done.stderr


@pytest.mark.anyio
async def test_model_control_waits_for_the_models_the_server_starts_with(tmp_path) -> None:
    """A load asked while the start's models still load would build the same model
    twice: it is refused with 503 and Retry-After until the server is ready."""
    import asyncio

    from service.engines import create_engine
    from service.errors import NotReady
    from service.metrics import ServiceMetrics
    from service.runtime import ModelPool
    from service.settings import Settings

    settings = Settings(
        model_repository=[_repository(tmp_path)],
        model_control_mode="explicit",
        load_model=["*"],
        engine_threads=1,
    )
    building = threading.Event()

    def held_engines(bundle, model_settings):
        building.wait(TIMEOUT_S)
        return create_engine(bundle, model_settings)

    pool = ModelPool(settings, ServiceMetrics(), held_engines)
    starting = asyncio.ensure_future(pool.load())
    await asyncio.sleep(0.05)
    with pytest.raises(NotReady, match="models are still loading") as refused:
        await pool.load_model("tiny_cls")
    assert refused.value.headers == {"Retry-After": "5"}
    assert pool.index()[0] == {"name": "tiny_cls", "version": "1", "state": "LOADING"}
    building.set()
    await starting
    await pool.load_model("tiny_cls")  # once ready
    assert sorted(pool.runners) == ["tiny_cls", "tiny_seg"]
    await pool.close(1.0)


@pytest.mark.anyio
async def test_a_load_under_way_at_the_drain_stops_and_closes_what_it_built(tmp_path) -> None:
    import asyncio

    from service.engines import create_engine
    from service.errors import NotReady
    from service.metrics import ServiceMetrics
    from service.runtime import ModelPool
    from service.settings import Settings

    settings = Settings(
        model_repository=[_repository(tmp_path)], model_control_mode="explicit", engine_threads=1
    )
    building, built, closed = threading.Event(), [], []

    def held_engines(bundle, model_settings):
        building.wait(TIMEOUT_S)
        engine = create_engine(bundle, model_settings)
        built.append(engine)
        close = engine.close
        engine.close = lambda: (closed.append(engine), close())
        return engine

    pool = ModelPool(settings, ServiceMetrics(), held_engines)
    await pool.load()  # nothing named: ready at once, serving nothing
    loading = asyncio.ensure_future(pool.load_model("tiny_cls"))
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(pool.close(1.0))
    building.set()
    with pytest.raises(NotReady, match="shutting down"):
        await loading
    await closing
    assert pool.runners == {}
    assert len(built) == 1 and closed == built  # what it built is closed, not left behind


def test_polling_loads_reloads_and_unloads_as_bundles_come_change_and_go(tmp_path) -> None:
    repository = tmp_path / "repository"
    bundles.write_classifier(repository / "classifier")
    flags = ["--model-repository", str(repository), "--model-control-mode", "poll",
             "--repository-poll-secs", "0.2", "--engine-threads", "1"]  # fmt: skip
    image = _photo()
    log = tmp_path / "server.log"
    with running_server(flags, log_path=log, inherit_settings=False) as s:
        before = _top_label(s.url, image)
        bundles.write_segmenter(repository / "segmenter")  # a new bundle: loaded
        wait_until(lambda: _index(s.url).get("tiny_seg") == ("READY", ""), TIMEOUT_S)
        segmented = httpx.post(f"{s.url}/segment", files=upload(image), timeout=TIMEOUT_S)
        assert segmented.status_code == 200, segmented.text

        reversed_labels = _reverse_labels(repository / "classifier")  # a new version
        after = reversed_labels[reversed_labels[::-1].index(before)]
        wait_until(lambda: _top_label(s.url, image) == after, TIMEOUT_S)

        # a version that does not verify: the one in service stays, and it is not
        # tried again at every look, only once its files change again
        graph = repository / "classifier" / "model.onnx"
        good = graph.read_bytes()
        graph.write_bytes(good + b"\0")
        wait_until(lambda: log.read_text().count('"message": "model load failed"') == 1, TIMEOUT_S)
        time.sleep(1.0)  # five looks more
        assert log.read_text().count('"message": "model load failed"') == 1
        assert _top_label(s.url, image) == after
        serving_line = '"message": "model serving"'
        serving = log.read_text().count(serving_line)
        graph.write_bytes(good)  # the copy completes: loaded
        wait_until(lambda: log.read_text().count(serving_line) == serving + 1, TIMEOUT_S)
        assert _top_label(s.url, image) == after

        shutil.rmtree(repository / "segmenter")  # gone: unloaded
        wait_until(lambda: "tiny_seg" not in _index(s.url), TIMEOUT_S)
        gone = httpx.post(f"{s.url}/segment?model=tiny_seg", files=upload(image))
        assert gone.status_code == 404, gone.text

        refused = httpx.post(f"{s.url}/v2/repository/models/tiny_cls/unload")
        assert refused.status_code == 403, refused.text
        assert "--model-control-mode poll" in refused.json()["error"]
    metrics_lines = log.read_text()
    assert metrics_lines.count('"message": "model retired"') == 3  # two reloads, an unload


@pytest.mark.anyio
async def test_a_bundle_missing_for_one_look_is_not_unloaded(tmp_path) -> None:
    """A bundle being rewritten in place (its manifest gone for a moment) stays served;
    gone at two looks in a row, it is unloaded."""
    from service.metrics import ServiceMetrics
    from service.runtime import ModelPool
    from service.settings import Settings

    repository = _repository(tmp_path)
    settings = Settings(
        model_repository=[repository],
        model_control_mode="poll",
        repository_poll_secs=3600,  # the looks are made here, by hand
        engine_threads=1,
    )
    pool = ModelPool(settings, ServiceMetrics())
    await pool.load()
    manifest = repository / "segmenter" / "manifest.json"
    kept = manifest.read_bytes()
    failed: dict[str, str] = {}
    manifest.unlink()
    missing = await pool._poll_once(failed, set())
    assert missing == {"tiny_seg"} and "tiny_seg" in pool.runners
    manifest.write_bytes(kept)
    missing = await pool._poll_once(failed, missing)
    assert missing == set() and "tiny_seg" in pool.runners and failed == {}
    manifest.unlink()
    missing = await pool._poll_once(failed, await pool._poll_once(failed, set()))
    assert "tiny_seg" not in pool.runners and sorted(pool.runners) == ["tiny_cls"]
    await pool.close(1.0)


def test_a_grpc_stream_loses_no_request_across_reloads(tmp_path) -> None:
    """tritonclient's stream (as ModelMesh-style clients keep one open) while the model
    is reloaded three times: every request sent is answered, none with an error."""
    import queue

    grpc_port = free_port()
    flags = ["--model-repository", str(_repository(tmp_path)), "--model-control-mode",
             "explicit", "--load-model", "tiny_cls", "--engine-threads", "1",
             "--grpc-port", str(grpc_port)]  # fmt: skip
    image = np.array([_photo()], dtype=object)
    with running_server(flags, log_path=tmp_path / "server.log", inherit_settings=False) as s:
        rest = httpclient.InferenceServerClient(s.url.removeprefix("http://"))
        client = grpcclient.InferenceServerClient(f"{LOOPBACK}:{grpc_port}")
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        tensor = grpcclient.InferInput("encoded_image", [1], "BYTES")
        tensor.set_data_from_numpy(image)
        sent = 0
        try:
            for round_ in range(4):
                for _ in range(10):
                    client.async_stream_infer("tiny_cls", [tensor], request_id=str(sent))
                    sent += 1
                if round_ < 3:
                    rest.load_model("tiny_cls")  # with those in flight
            got = [answers.get(timeout=TIMEOUT_S) for _ in range(sent)]
        finally:
            client.stop_stream()
            client.close()
            rest.close()
    errors = [error.message() for _, error in got if error is not None]
    assert errors == []
    assert sorted(int(result.get_response().id) for result, _ in got) == list(range(sent))
    assert (tmp_path / "server.log").read_text().count('"message": "model retired"') == 3


@pytest.mark.anyio
async def test_a_retired_version_is_freed_without_waiting_for_a_cyclic_collection(
    tmp_path,
) -> None:
    """Nothing of a retired version stays in a reference cycle (its closed batch queue
    drops its workers, observers and cancelled batch-forming task, whose traceback held
    the worker), so its memory goes when it is retired, not at Python's next full
    collection: checked with the cyclic collector off."""
    import asyncio
    import gc
    import weakref

    from service.metrics import ServiceMetrics
    from service.runtime import ModelPool
    from service.settings import Settings

    settings = Settings(
        model_repository=[_repository(tmp_path)],
        model_control_mode="explicit",
        load_model=["tiny_cls"],
        engine_threads=1,
    )
    pool = ModelPool(settings, ServiceMetrics())
    await pool.load()
    gc.collect()
    gc.disable()
    try:
        retired = weakref.ref(pool.runners["tiny_cls"])
        await pool.load_model("tiny_cls")
        for _ in range(200):
            if retired() is None:
                break
            await asyncio.sleep(0.01)
        assert retired() is None
    finally:
        gc.enable()
        await pool.close(1.0)
