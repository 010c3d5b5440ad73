"""--instances K holding one copy of the weights (--share-weights, the default): the
instances answer side by side exactly as one engine does, a second instance costs a
small part of what a second copy of the weights costs, and where sharing would be slower
(more than one ONNX Runtime thread per instance) or is turned off each instance loads its
own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hornet_bundle import load_bundle
from service.engines import OnnxRuntimeEngine, create_engine, sibling_of
from service.settings import Settings
from tests.helpers import demo
from tests.helpers.images import encode, upload
from tests.helpers.serving import serving

FEATURES, WIDTH = 1024, 16384  # the weight: 64 MiB of float32
WEIGHT_MIB = FEATURES * WIDTH * 4 / 2**20
WEIGHT = np.random.default_rng(5).normal(0, 0.03, (FEATURES, WIDTH)).astype(np.float32)
ENGINES = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def heavy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x (batch, 1024) -> MatMul by a 64 MiB weight -> ReLU -> sum over its 16384 columns."""
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["product"]),
        helper.make_node("Relu", ["product"], ["positive"]),
        helper.make_node("ReduceSum", ["positive", "axes"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        initializer=[
            numpy_helper.from_array(WEIGHT, "weight"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("heavy") / "heavy.onnx"
    onnx.save(model, str(path))
    return path


def _engine(kind: str, path: Path, threads: int = 1, streams: int = 2):
    if kind == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
        from service.engines import OpenVinoEngine

        return OpenVinoEngine(path, threads=threads, streams=streams)
    return OnnxRuntimeEngine(path, threads=threads)


def _reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x.astype(np.float64) @ WEIGHT.astype(np.float64), 0).sum(axis=1)


def _side_by_side(engines: list, job) -> None:
    """`job(engine, index)` for every engine at once, a thread each; then the engines
    closed."""
    workers = [threading.Thread(target=job, args=(e, i)) for i, e in enumerate(engines)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for engine in engines:
        engine.close()


@pytest.mark.parametrize("kind", ENGINES)
def test_siblings_running_side_by_side_each_get_their_own_answers(kind, heavy_model) -> None:
    """More instances of one engine than this machine has CPUs (at least three) running
    at once; OpenVINO, compiled for that many streams, makes no more than the CPUs, and
    the instances take turns on them."""
    count = max(3, 2 * len(os.sched_getaffinity(0)) + 1)
    first = _engine(kind, heavy_model, streams=count)
    if kind == "openvino":
        assert first.streams_made <= len(os.sched_getaffinity(0))
        assert f" {first.streams_made} streams" in first.description
    engines = [first] + [sibling_of(first, Settings()) for _ in range(count - 1)]
    assert None not in engines
    rng = np.random.default_rng(1)
    inputs = [rng.normal(0, 1, (rows, FEATURES)).astype(np.float32) for rows in (1, 3, 2, 4)]
    failures: list[str] = []

    def serve(engine, offset: int) -> None:
        for step in range(6):
            x = inputs[(step + offset) % len(inputs)]
            got = engine.run({"x": x})["y"]
            if not np.allclose(got, _reference(x), rtol=1e-4, atol=1e-3):
                failures.append(f"step {step}: {got} vs {_reference(x)}")

    _side_by_side(engines, serve)
    assert not failures, failures


DEMO_INPUTS = {  # two inputs per task in the demo bundles' shapes: (images, height, width)
    "classify": [(3, 96, 96), (1, 96, 96)],
    "segment": [(2, 128, 128), (1, 128, 128)],
    "detect": [(None, 192, 256), (None, 256, 192)],  # one image per call, any size
}


def _demo_input(rng: np.random.Generator, count: int | None, height: int, width: int):
    """Scenes of the demo's shapes (what its models were trained on), stacked to a batch
    unless `count` is None."""
    from model_export.demo.shapes import generate_scene

    scenes = [
        generate_scene(rng, height, width, num_shapes=(2, 3)).image for _ in range(count or 1)
    ]
    return np.stack(scenes) if count else scenes[0]


@pytest.mark.parametrize("task", sorted(DEMO_INPUTS))
@pytest.mark.parametrize("kind", ENGINES)
def test_demo_models_of_every_task_answer_alike_on_siblings(kind, task) -> None:
    """Both instances of each demo model (HorNet classifier, UperNet segmenter, cascade
    detector, the last with a dynamic image size) running at once, each input on the
    other instance too, give what one lone engine gives."""
    if kind == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    bundle = load_bundle(demo.bundle_dir(task))
    settings = Settings(engine=kind, engine_threads=1, instances=2)
    rng = np.random.default_rng(2)
    inputs = [_demo_input(rng, *shape) for shape in DEMO_INPUTS[task]]
    lone = create_engine(bundle, settings.model_copy(update={"instances": 1}))
    want = [lone.run({"image": image}) for image in inputs]
    lone.close()
    if task == "detect":
        assert all(len(outputs["boxes"]) for outputs in want)  # something to compare
    first = create_engine(bundle, settings)
    pair = [first, sibling_of(first, settings)]
    assert pair[1] is not None
    got: dict[tuple[int, int], dict] = {}

    def serve(engine, index: int) -> None:
        for step in range(6):
            which = (step + index) % len(inputs)
            got[index, step] = (which, engine.run({"image": inputs[which]}))

    _side_by_side(pair, serve)
    assert len(got) == 12
    for which, outputs in got.values():
        assert outputs.keys() == want[which].keys()
        for name, expected in want[which].items():
            np.testing.assert_allclose(
                outputs[name], expected, rtol=1e-5, atol=1e-5 * max(np.abs(expected).max(), 1)
            )


def test_no_sibling_where_sharing_would_be_slower_or_is_turned_off(heavy_model) -> None:
    # two threads each: the instances' runs would share one session's thread pool
    assert sibling_of(OnnxRuntimeEngine(heavy_model, threads=2), Settings()) is None
    assert (
        sibling_of(OnnxRuntimeEngine(heavy_model, threads=1), Settings(share_weights=False)) is None
    )
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    # compiled as one stream: a sibling would wait for it
    assert sibling_of(_engine("openvino", heavy_model, streams=1), Settings()) is None


MEASURE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from pathlib import Path
    from service.engines import OnnxRuntimeEngine, OpenVinoEngine, sibling_of
    from service.settings import Settings

    kind, path, shared = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    x = np.ones((2, {features}), np.float32)

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    def engine():
        if kind == "openvino":
            return OpenVinoEngine(path, threads=1, streams=2)
        return OnnxRuntimeEngine(path, threads=1)

    first = engine()
    first.run({{"x": x}})
    before = rss_mib()
    second = sibling_of(first, Settings()) if shared else engine()
    second.run({{"x": x}})
    print(json.dumps({{"second_mib": rss_mib() - before}}))
    """
).format(features=FEATURES)


@pytest.mark.parametrize("kind", ENGINES)
def test_a_sibling_costs_a_small_part_of_a_copy_of_the_weights(kind, heavy_model) -> None:
    """Each case in a fresh process: the resident memory a second instance adds, with its
    first run, as a sibling and as an engine of its own, against the weight's 64 MiB."""
    if kind == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    added = {}
    for shared in (True, False):
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, kind, str(heavy_model), "1" if shared else "0"],
            capture_output=True,
            text=True,
            timeout=240,
            check=True,
        )
        added[shared] = json.loads(done.stdout.splitlines()[-1])["second_mib"]
    assert added[False] > 0.75 * WEIGHT_MIB, added  # the measurement sees a copy
    assert added[True] < 0.2 * WEIGHT_MIB, added


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("settings", "copies"),
    [
        ({}, 1),
        ({"share_weights": False}, 2),
        ({"engine": "openvino"}, 1),
        ({"engine_threads": 2}, 2),
    ],
)
async def test_served_instances_report_their_copies_and_answer_alike(
    classifier_dir, photos, settings, copies
) -> None:
    if settings.get("engine") == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    images = [encode(photos[name]) for name in ("coffee", "rocket", "chelsea", "astronaut")] * 3
    async with serving([classifier_dir], instances=2, max_batch_size=2, **settings) as client:
        model = (await client.get("/v1/models")).json()["models"][0]
        with anyio.fail_after(60):
            singles = {}
            for image in images[:4]:
                answer = await client.post("/classify", params={"top_k": 10}, files=upload(image))
                singles[image] = answer.json()["results"][0]["top_k"]
            answers = await _gather(client, images)
    assert model["weight_copies"] == copies
    assert model["batching"]["instances"] == 2
    for image, answer in zip(images, answers, strict=True):
        assert answer.status_code == 200
        got = answer.json()["results"][0]["top_k"]
        assert [e["index"] for e in got] == [e["index"] for e in singles[image]]
        np.testing.assert_allclose(
            [e["score"] for e in got], [e["score"] for e in singles[image]], rtol=1e-4
        )


async def _gather(client, images: list[bytes]) -> list:
    results: list = [None] * len(images)

    async def post(index: int) -> None:
        results[index] = await client.post(
            "/classify", params={"top_k": 10}, files=upload(images[index])
        )

    async with anyio.create_task_group() as group:
        for index in range(len(images)):
            group.start_soon(post, index)
    return results
