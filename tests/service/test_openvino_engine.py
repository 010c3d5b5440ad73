"""`--engine openvino`: the bundle's fp32 graph compiled by OpenVINO for the CPU, in fp32
or bf16, computing what ONNX Runtime computes; and what it refuses, in one sentence."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from importlib import metadata

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from hornet_bundle import ENGINE_ENTRY_POINTS, load_bundle
from hornet_bundle.preprocess import classification_input
from service import engines
from service.engines import EngineUnavailable, cpu_runs_bf16, create_engine
from service.settings import Settings
from tests.helpers import demo

pytest.importorskip("openvino", reason="the openvino extra is not installed")

RNG = np.random.default_rng(11)
INPUTS = {
    "classify": RNG.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8),
    "segment": RNG.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8),
    "detect": RNG.integers(0, 256, (48, 80, 3), dtype=np.uint8),
}


def _outputs(bundle_dir, image: np.ndarray, **settings) -> dict[str, np.ndarray]:
    engine = create_engine(load_bundle(bundle_dir), Settings(**settings))
    try:
        return engine.run({"image": image})
    finally:
        engine.close()


def _assert_answers_as_onnxruntime(
    got: dict[str, np.ndarray], bundle_dir, image: np.ndarray, atol_floor: float = 0.0
) -> None:
    """`got` holds ONNX Runtime's outputs for `image` on the bundle's unchanged graph: the
    same names and shapes, within rtol 1e-4 and atol 1e-4 of the largest magnitude (or
    of `atol_floor`, where larger)."""
    want = _outputs(bundle_dir, image)
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].shape == expected.shape
        scale = max(np.abs(expected).max(), atol_floor)
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize(
    ("task", "fixture"),
    [("classify", "classifier_dir"), ("segment", "segmenter_dir"), ("detect", "detector_dir")],
)
def test_openvino_fp32_matches_onnxruntime(task, fixture, request) -> None:
    bundle_dir = request.getfixturevalue(fixture)
    want = _outputs(bundle_dir, INPUTS[task])
    got = _outputs(bundle_dir, INPUTS[task], engine="openvino")
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
        np.testing.assert_allclose(
            got[name], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
        )


def test_openvino_keeps_the_batch_axis_dynamic(classifier_dir) -> None:
    one = _outputs(classifier_dir, INPUTS["classify"][:1], engine="openvino")["logits"]
    three = _outputs(classifier_dir, INPUTS["classify"], engine="openvino")["logits"]
    np.testing.assert_allclose(three[:1], one, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning shows on 2+ CPUs")
@pytest.mark.parametrize("share", [True, False], ids=["two-streams", "two-models"])
def test_single_thread_instances_are_not_pinned_to_one_core(classifier_dir, share) -> None:
    """Two one-thread engines (--instances 2 --engine-threads 1) running at once, as two
    streams of one compiled model (--share-weights) or as two models: OpenVINO would pin
    both to the first core; no thread of this process may be narrowed to fewer CPUs than
    the process has while they run."""
    settings = Settings(engine="openvino", engine_threads=1, instances=2, share_weights=share)
    first = create_engine(load_bundle(classifier_dir), settings)
    second = engines.sibling_of(first, settings)
    assert (second is not None) == share
    pair = [first, second or create_engine(load_bundle(classifier_dir), settings)]
    allowed = os.sched_getaffinity(0)
    running = threading.Event()
    stop = threading.Event()

    def serve(engine) -> None:
        while not stop.is_set():
            engine.run({"image": INPUTS["classify"]})
            running.set()

    workers = [threading.Thread(target=serve, args=(engine,)) for engine in pair]
    narrowed: set[tuple[int, frozenset[int]]] = set()
    try:
        for worker in workers:
            worker.start()
        assert running.wait(60)
        for _ in range(300):
            for task in os.listdir("/proc/self/task"):
                with contextlib.suppress(OSError):
                    cpus = os.sched_getaffinity(int(task))
                    if cpus != allowed:
                        narrowed.add((int(task), frozenset(cpus)))
            time.sleep(0.002)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        for engine in pair:
            engine.close()
    assert not narrowed, f"threads pinned to fewer CPUs than {sorted(allowed)}: {narrowed}"


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_exported_channel_norms_are_rewritten_channels_first_with_the_graphs_outputs(task) -> None:
    """The exporters write each channels-first LayerNorm as Transpose -> LayerNormalization
    -> Transpose; the engine rewrites every one of them (the manifest counts them) into
    a norm over the channel axis, and the demo model still answers as ONNX Runtime does on
    the unchanged graph."""
    bundle_dir = demo.bundle_dir(task)
    bundle = load_bundle(bundle_dir)
    engine = create_engine(bundle, Settings(engine="openvino"))
    try:
        assert engine.unfused_norms == bundle.manifest.export["fused_layer_norms"] > 0
        image = graph_input(bundle)
        got = engine.run({"image": image})
    finally:
        engine.close()
    _assert_answers_as_onnxruntime(got, bundle_dir, image)


def test_global_filter_channel_splits_become_gathers_with_the_graphs_outputs() -> None:
    """Each Global Filter layer splits its channels into a local and a global half; the
    engine gathers the halves instead (one per GF layer the manifest counts), and the
    demo GF classifier still answers as ONNX Runtime does on the unchanged graph."""
    bundle_dir = demo.bundle_dir("classify")
    bundle = load_bundle(bundle_dir)
    engine = create_engine(bundle, Settings(engine="openvino"))
    try:
        assert engine.gathered_splits == sum(bundle.manifest.export["gf_layers"].values()) > 0
        image = graph_input(bundle)
        got = engine.run({"image": image})
    finally:
        engine.close()
    _assert_answers_as_onnxruntime(got, bundle_dir, image)


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_static_shapes_answer_as_the_dynamic_graph_in_pieces(task) -> None:
    """--openvino-static-shapes with a max batch of 4 compiles batch sizes 4, 2 and 1 and
    runs 7 images as 4 + 2 + 1; the answers are ONNX Runtime's on the whole batch."""
    bundle_dir = demo.bundle_dir(task)
    bundle = load_bundle(bundle_dir)
    settings = Settings(engine="openvino", openvino_static_shapes=True, max_batch_size=4)
    engine = create_engine(bundle, settings)
    try:
        assert engine.static_sizes == (4, 2, 1)
        assert "static batches 4,2,1" in engine.description
        image = graph_input(bundle, 7)
        got = engine.run({"image": image})
    finally:
        engine.close()
    _assert_answers_as_onnxruntime(got, bundle_dir, image)


def test_the_detector_stays_dynamic_with_static_shapes(detector_dir) -> None:
    """The detector's image size varies from request to request: no static models."""
    settings = Settings(engine="openvino", openvino_static_shapes=True)
    engine = create_engine(load_bundle(detector_dir), settings)
    try:
        assert engine.static_sizes == ()
        got = engine.run({"image": INPUTS["detect"]})
    finally:
        engine.close()
    _assert_answers_as_onnxruntime(got, detector_dir, INPUTS["detect"], atol_floor=1.0)


@pytest.mark.parametrize(("max_batch", "sizes"), [(8, (8, 4, 2, 1)), (6, (6, 4, 2, 1)), (1, (1,))])
def test_static_sizes_are_the_max_batch_and_the_powers_of_two_below(max_batch, sizes) -> None:
    assert engines.static_sizes(max_batch) == sizes


@pytest.mark.parametrize("count", range(1, 40))
def test_batch_pieces_cover_the_batch_largest_first(count) -> None:
    sizes = engines.static_sizes(8)
    pieces = engines.batch_pieces(count, sizes)
    assert sum(pieces) == count and set(pieces) <= set(sizes)
    assert pieces == sorted(pieces, reverse=True)
    assert pieces.count(8) == count // 8 and len(pieces) == count // 8 + bin(count % 8).count("1")


def graph_input(bundle, count: int = 3) -> np.ndarray:
    """`count` random images at the graph's NHWC input size."""
    _, height, width, _ = bundle.manifest.inputs[0].shape
    return RNG.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_openvino_describes_itself_with_its_precision(classifier_dir) -> None:
    engine = create_engine(load_bundle(classifier_dir), Settings(engine="openvino"))
    assert engine.description.startswith("openvino ") and " fp32 model.onnx" in engine.description
    engine.close()


def test_bf16_on_a_cpu_without_bf16_is_refused_naming_the_missing_capability(
    classifier_dir, monkeypatch
) -> None:
    monkeypatch.setattr(engines, "cpu_runs_bf16", lambda: False)
    with pytest.raises(EngineUnavailable, match=r"needs a CPU with AVX512_BF16 or AMX-BF16"):
        create_engine(load_bundle(classifier_dir), Settings(engine="openvino", precision="bf16"))


def test_openvino_refuses_fp16(classifier_dir) -> None:
    with pytest.raises(EngineUnavailable, match="runs fp32, bf16 or int8, not fp16"):
        create_engine(load_bundle(classifier_dir), Settings(engine="openvino", precision="fp16"))


def test_openvino_runs_on_the_cpu_only(classifier_dir) -> None:
    with pytest.raises(EngineUnavailable, match="runs on the CPU, not cuda"):
        create_engine(load_bundle(classifier_dir), Settings(engine="openvino", device="cuda"))


@pytest.mark.parametrize("engine", ["onnxruntime", "tensorrt", "torch"])
def test_bf16_on_another_engine_is_an_invalid_setting(engine) -> None:
    with pytest.raises(ValidationError, match="precision bf16 runs on --engine openvino only"):
        Settings(engine=engine, precision="bf16")


def test_the_openvino_engine_is_registered_for_the_exporters_verification() -> None:
    (entry_point,) = metadata.entry_points(group=ENGINE_ENTRY_POINTS, name="openvino")
    assert entry_point.load() is engines.openvino_engine


@pytest.mark.skipif(
    not cpu_runs_bf16(), reason="this CPU has no bf16 arithmetic (AVX512_BF16 or AMX-BF16)"
)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-shapes"])
def test_bf16_demo_classifier_agrees_with_fp32_on_the_photographs(photos, static) -> None:
    """bf16 within 2e-2 of fp32 and the same top-1, with the dynamic graph (what `hornet
    verify --precision bf16` checks) and with --openvino-static-shapes, whose fusions
    round differently (5 photographs: pieces of 4 and 1)."""
    bundle = load_bundle(demo.bundle_dir("classify"))
    crops = np.stack(
        [
            classification_input(Image.fromarray(p).convert("RGB"), bundle.manifest.preprocess)
            for p in photos.values()
        ]
    )
    fp32 = _outputs(bundle.path, crops)["logits"]
    bf16 = _outputs(
        bundle.path,
        crops,
        engine="openvino",
        precision="bf16",
        openvino_static_shapes=static,
        max_batch_size=4,
    )["logits"]
    assert np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32) < 2e-2
    assert (bf16.argmax(-1) == fp32.argmax(-1)).all()
