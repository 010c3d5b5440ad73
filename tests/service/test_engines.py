"""Engines behind one interface: which one a bundle and settings give, and what each
refuses. GPU engines are checked where a CUDA GPU exists (marked `gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from hornet_bundle import load_bundle
from service.engines import EngineUnavailable, create_engine
from service.settings import Settings
from tests.helpers import bundles


def _inputs(count: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"image": rng.integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)}


def _run(classifier_dir, **settings) -> np.ndarray:
    engine = create_engine(load_bundle(classifier_dir), Settings(**settings))
    try:
        return engine.run(_inputs())["logits"]
    finally:
        engine.close()


def test_onnxruntime_cpu_engine_computes_the_graph(classifier_dir) -> None:
    logits = _run(classifier_dir)
    expected = [bundles.reference_logits(image) for image in _inputs()["image"]]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_tensorrt_engine_needs_a_tensorrt_file_in_the_bundle(classifier_dir) -> None:
    with pytest.raises(EngineUnavailable, match="has no tensorrt engine"):
        create_engine(load_bundle(classifier_dir), Settings(engine="tensorrt", device="cuda"))


def test_torch_engine_refuses_random_weight_bundles(classifier_dir) -> None:
    with pytest.raises(EngineUnavailable, match="random weights"):
        create_engine(load_bundle(classifier_dir), Settings(engine="torch"))


@pytest.mark.gpu
def test_onnxruntime_cuda_engine_matches_cpu(classifier_dir) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    cpu = _run(classifier_dir)
    # fp32 stays fp32 on the GPU by default (no TF32): as close as the export's parity check.
    np.testing.assert_allclose(_run(classifier_dir, device="cuda"), cpu, rtol=1e-5, atol=1e-5)
    tf32 = _run(classifier_dir, device="cuda", cuda_tf32=True)
    assert np.linalg.norm(tf32 - cpu) / np.linalg.norm(cpu) < 1e-2


def test_cuda_device_without_the_gpu_runtime_is_refused_clearly(classifier_dir) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(EngineUnavailable, match="onnxruntime-gpu"):
        _run(classifier_dir, device="cuda")


def test_cuda_provider_keeps_fp32_unless_tf32_is_asked_for() -> None:
    """The CUDA provider's documented `use_tf32` option (default on in ONNX Runtime) is
    sent explicitly: off by default, on with --cuda-tf32 / HORNET_CUDA_TF32."""
    from service.cli import load_settings
    from service.engines import _ort_providers

    def cuda_options(settings: Settings) -> dict:
        providers = _ort_providers(
            settings.device, False, "fp32", None, settings.cuda_tf32, settings.cuda_conv_algo_search
        )
        return dict(providers)["CUDAExecutionProvider"]

    default = cuda_options(load_settings(["--device", "cuda"]))
    assert default == {"use_tf32": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert cuda_options(load_settings(["--device", "cuda", "--cuda-tf32"]))["use_tf32"] == 1
    assert _ort_providers("cpu", False, "fp32", None, True) == [("CPUExecutionProvider", {})]


@pytest.mark.parametrize("search", ["exhaustive", "heuristic", "default"])
def test_the_cuda_convolution_search_is_the_providers_option_of_that_name(search) -> None:
    """ONNX Runtime's CUDA provider documents cudnn_conv_algo_search as EXHAUSTIVE,
    HEURISTIC or DEFAULT; the flag and its environment variable give one of them."""
    from service.cli import load_settings
    from service.engines import _ort_providers

    settings = load_settings(["--device", "cuda", "--cuda-conv-algo-search", search])
    providers = dict(
        _ort_providers("cuda", False, "fp32", None, False, settings.cuda_conv_algo_search)
    )
    assert providers["CUDAExecutionProvider"]["cudnn_conv_algo_search"] == search.upper()
    with pytest.raises(SystemExit):
        load_settings(["--cuda-conv-algo-search", "fastest"])


@pytest.mark.parametrize(("spinning", "stop"), [(False, "1"), (True, "0")])
def test_onnxruntime_threads_spin_during_runs_and_stop_after_them_unless_asked(
    classifier_dir, spinning: bool, stop: str
) -> None:
    """Spinning speeds the hand-off between a run's threads; between runs it would take
    the cores from decoding, so it stops when a run returns unless --engine-spinning."""
    engine = create_engine(load_bundle(classifier_dir), Settings(engine_spinning=spinning))
    try:
        options = engine._sessions[0].get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert options.get_session_config_entry("session.force_spinning_stop") == stop
    finally:
        engine.close()


def _onnx_path(model_dir):
    bundle = load_bundle(model_dir)
    return bundle.file(bundle.manifest.engine_for("onnx", "fp32").file)


def _static_engine(model_dir, static_batch: int):
    from service.engines import OnnxRuntimeEngine

    return OnnxRuntimeEngine(_onnx_path(model_dir), static_batch=static_batch)


def test_static_batch_sessions_fix_the_batch_axis_of_each_size(classifier_dir) -> None:
    """One session per size, the graph's dynamic batch axis fixed there (ONNX Runtime's
    free-dimension override): what each session reports is its own shape."""
    engine = _static_engine(classifier_dir, 6)
    try:
        assert engine.static_sizes == (6, 4, 2, 1)
        assert engine.description.endswith(".onnx static batches 6,4,2,1")
        shapes = {size: s.get_inputs()[0].shape for size, s in engine._sessions.items()}
        assert shapes == {size: [size, 224, 224, 3] for size in (6, 4, 2, 1)}
    finally:
        engine.close()


@pytest.mark.parametrize("count", [1, 2, 3, 5, 6, 7, 13])
def test_static_batch_sessions_answer_as_the_dynamic_graph(classifier_dir, count) -> None:
    """A batch runs padded on the smallest session that holds it (above the largest, in
    pieces of the largest); each session only ever sees its own shape, and the padding
    changes no image's answer: the same logits as the dynamic session, image by image."""
    engine = _static_engine(classifier_dir, 6)
    seen: list[tuple[int, int]] = []
    run = engine._run

    def recording(session, inputs):
        seen.append((session.get_inputs()[0].shape[0], len(inputs["image"])))
        return run(session, inputs)

    engine._run = recording
    images = _inputs(count)
    try:
        logits = engine.run(images)["logits"]
    finally:
        engine.close()
    assert all(fixed == given for fixed, given in seen)
    expected_sizes = [6] * (count // 6) + (
        [min(s for s in (6, 4, 2, 1) if s >= count % 6)] if count % 6 else []
    )
    assert [given for _, given in seen] == expected_sizes
    dynamic = create_engine(load_bundle(classifier_dir), Settings())
    try:
        np.testing.assert_allclose(logits, dynamic.run(images)["logits"], rtol=1e-5, atol=1e-5)
    finally:
        dynamic.close()


def test_static_batch_sessions_serve_segmentation_tiles(segmenter_dir) -> None:
    engine = _static_engine(segmenter_dir, 4)
    dynamic = create_engine(load_bundle(segmenter_dir), Settings())
    rng = np.random.default_rng(5)
    name = dynamic._sessions[0].get_inputs()[0]
    tiles = {name.name: rng.integers(0, 256, (3, *name.shape[1:]), dtype=np.uint8)}
    try:
        assert engine.static_sizes == (4, 2, 1)
        (logits,) = engine.run(tiles).values()
        (expected,) = dynamic.run(tiles).values()
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    finally:
        engine.close()
        dynamic.close()


def test_a_nameless_batch_axis_gets_static_batch_sessions_too(tmp_path) -> None:
    """Without a name to fix the axis by, each session still sees only its own size."""
    from onnx import TensorProto, helper, save

    from service.engines import OnnxRuntimeEngine

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, tmp_path / "m.onnx")
    engine = OnnxRuntimeEngine(tmp_path / "m.onnx", static_batch=4)
    x = np.array([[-1.0, 2.0], [3.0, -4.0], [0.5, 0.0]], np.float32)
    try:
        assert engine.static_sizes == (4, 2, 1)
        np.testing.assert_array_equal(engine.run({"x": x})["y"], np.maximum(x, 0))
    finally:
        engine.close()


def test_the_detector_keeps_one_dynamic_session(detector_dir) -> None:
    """Its image size varies: no batch axis to fix."""
    engine = _static_engine(detector_dir, 8)
    try:
        assert engine.static_sizes == ()
        assert "static" not in engine.description
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("overrides", "static"),
    [
        ({"device": "cuda"}, True),
        ({"device": "cpu"}, False),
        ({"device": "cuda", "cuda_static_shapes": False}, False),
        ({"device": "cuda", "ort_tensorrt": True}, False),
        ({"device": "cuda", "engine": "tensorrt"}, False),
    ],
)
def test_static_batch_sessions_are_for_onnxruntime_on_cuda(overrides, static) -> None:
    from service.engines import cuda_static_shapes

    assert cuda_static_shapes(Settings(**overrides)) is static


def test_no_cuda_static_shapes_is_a_flag_and_an_environment_variable(monkeypatch) -> None:
    from service.cli import load_settings

    assert load_settings([]).cuda_static_shapes is True
    assert load_settings(["--no-cuda-static-shapes"]).cuda_static_shapes is False
    monkeypatch.setenv("HORNET_CUDA_STATIC_SHAPES", "false")
    assert load_settings([]).cuda_static_shapes is False


@pytest.mark.gpu
def test_onnxruntime_cuda_static_sessions_match_cpu_at_every_size(classifier_dir) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    cuda = create_engine(load_bundle(classifier_dir), Settings(device="cuda", max_batch_size=4))
    cpu = create_engine(load_bundle(classifier_dir), Settings())
    try:
        assert cuda.static_sizes == (4, 2, 1)
        for count in (1, 3, 4, 2, 5):
            images = _inputs(count)
            np.testing.assert_allclose(
                cuda.run(images)["logits"], cpu.run(images)["logits"], rtol=1e-5, atol=1e-5
            )
    finally:
        cuda.close()
        cpu.close()


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_static_batch_sessions_run_the_exported_demo_graphs_as_the_dynamic_one(task) -> None:
    """The exporter's own graphs (named batch axis, the segmenter's outputs with dynamic
    spatial axes): static sessions of 4, 2, 1 answer 3 images as one dynamic session."""
    from service.engines import OnnxRuntimeEngine
    from tests.helpers import demo

    path = _onnx_path(demo.bundle_dir(task))
    static, dynamic = OnnxRuntimeEngine(path, static_batch=4), OnnxRuntimeEngine(path)
    try:
        assert static.static_sizes == (4, 2, 1)
        shape = dynamic._sessions[0].get_inputs()[0].shape
        assert shape[0] == "batch"
        rng = np.random.default_rng(7)
        images = {"image": rng.integers(0, 256, (3, *shape[1:]), dtype=np.uint8)}
        got, expected = static.run(images), dynamic.run(images)
        for key, value in expected.items():
            assert got[key].shape == value.shape
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-4)
    finally:
        static.close()
        dynamic.close()


def test_the_detector_gets_a_session_per_input_shape_for_the_last_k_shapes() -> None:
    """Shapes A, B, A, C, A, B with room for two: A keeps its session throughout, C
    takes B's place (B was used least recently) and B's return takes C's; every session
    only ever sees one shape, and the answers are the dynamic session's."""
    from service.engines import OnnxRuntimeEngine
    from tests.helpers import demo

    path = _onnx_path(demo.bundle_dir("detect"))
    engine = OnnxRuntimeEngine(path, static_batch=8, shape_sessions=2)
    dynamic = OnnxRuntimeEngine(path)
    made, new_session = [], engine._new_session
    engine._new_session = lambda: made.append(new_session()) or made[-1]
    seen: dict[int, set] = {}
    run = engine._run

    def recording(session, inputs):
        seen.setdefault(id(session), set()).add(inputs["image"].shape)
        return run(session, inputs)

    engine._run = recording
    rng = np.random.default_rng(11)
    shapes = {"A": (192, 256, 3), "B": (256, 192, 3), "C": (144, 256, 3)}
    images = {key: rng.integers(0, 256, shape, dtype=np.uint8) for key, shape in shapes.items()}
    try:
        assert engine.static_sizes == () and engine.shape_sessions == 2
        assert engine.description.endswith("a session per input shape (up to 2)")
        for key in "ABACAB":
            got, expected = engine.run({"image": images[key]}), dynamic.run({"image": images[key]})
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4)
        # A on the first session; B, C and B again each made a new one.
        assert len(made) == 3
        assert all(len(shapes_seen) == 1 for shapes_seen in seen.values())
        assert len(seen) == 4
        assert [shape for ((_, shape),) in engine._by_shape] == [shapes["A"], shapes["B"]]
    finally:
        engine.close()
        dynamic.close()


def test_shape_sessions_are_a_cuda_setting_with_a_bound(monkeypatch) -> None:
    from service.cli import load_settings

    assert load_settings([]).cuda_shape_sessions == 4
    assert load_settings(["--cuda-shape-sessions", "1"]).cuda_shape_sessions == 1
    monkeypatch.setenv("HORNET_CUDA_SHAPE_SESSIONS", "8")
    assert load_settings([]).cuda_shape_sessions == 8
    for bad in ("0", "65"):
        with pytest.raises(ValidationError, match="cuda_shape_sessions"):
            load_settings(["--cuda-shape-sessions", bad])


@pytest.mark.gpu
def test_onnxruntime_cuda_detector_sessions_per_shape_match_cpu() -> None:
    import onnxruntime as ort

    from tests.helpers import demo

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    bundle = load_bundle(demo.bundle_dir("detect"))
    cuda = create_engine(bundle, Settings(device="cuda", cuda_shape_sessions=2))
    cpu = create_engine(bundle, Settings())
    rng = np.random.default_rng(13)
    try:
        assert cuda.shape_sessions == 2
        for shape in [(192, 256, 3), (256, 192, 3), (192, 256, 3), (144, 256, 3)]:
            image = {"image": rng.integers(0, 256, shape, dtype=np.uint8)}
            got, expected = cuda.run(image), cpu.run(image)
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-3)
    finally:
        cuda.close()
        cpu.close()
