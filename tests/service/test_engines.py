"""Engines behind one interface: which one a bundle and settings give, and what each
refuses. GPU engines are checked where a CUDA GPU exists (marked `gpu`)."""

from __future__ import annotations

import numpy as np
import pytest

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
        providers = _ort_providers(settings.device, False, "fp32", None, settings.cuda_tf32)
        return dict(providers)["CUDAExecutionProvider"]

    assert cuda_options(load_settings(["--device", "cuda"])) == {"use_tf32": 0}
    assert cuda_options(load_settings(["--device", "cuda", "--cuda-tf32"])) == {"use_tf32": 1}
    assert _ort_providers("cpu", False, "fp32", None, True) == [("CPUExecutionProvider", {})]


@pytest.mark.parametrize(("spinning", "stop"), [(False, "1"), (True, "0")])
def test_onnxruntime_threads_spin_during_runs_and_stop_after_them_unless_asked(
    classifier_dir, spinning: bool, stop: str
) -> None:
    """Spinning speeds the hand-off between a run's threads; between runs it would take
    the cores from decoding, so it stops when a run returns unless --engine-spinning."""
    engine = create_engine(load_bundle(classifier_dir), Settings(engine_spinning=spinning))
    try:
        options = engine._session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert options.get_session_config_entry("session.force_spinning_stop") == stop
    finally:
        engine.close()
