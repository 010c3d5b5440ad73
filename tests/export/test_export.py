"""`hornet export`: DFT-free Global Filters, verified bundles, fp16, the CLI, TensorRT."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hornet_bundle import BundleError, Manifest, load_bundle
from model_export import create_model
from model_export.export import ExportError, ExportOptions, classify, export
from model_export.export.classify import ClassifierGraph
from model_export.export.onnx_graph import onnx_op_types
from model_export.gf_rewrite import rewrite_global_filters

from ..models.conftest import TINY, randomize_


@pytest.fixture(scope="module")
def tiny_gf():
    return randomize_(create_model("hornet_tiny_gf", **TINY, image_size=96), seed=5)


def _torch_logits(model, images: np.ndarray) -> np.ndarray:
    """An independent path: float64 torch on the same uint8 pixels, normalised by hand."""
    cfg = model.pretrained_cfg
    x = torch.from_numpy(images).double().permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return copy.deepcopy(model).double()(x).numpy()


def _fresh_images(size: int, n: int = 3, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["auto", "matmul", "dense_dft", "circular_conv"])
def test_dft_free_rewrite_is_exact_in_torch(tiny_gf, mode):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    rewritten = rewrite_global_filters(copy.deepcopy(tiny_gf), mode)
    with torch.no_grad():
        want = tiny_gf.double()(x.double())
        got = rewritten.double()(x.double())
    tiny_gf.float()
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert set(rewritten.state_dict()) == set(tiny_gf.state_dict())  # checkpoints unchanged


def test_rewritten_filter_refuses_another_feature_size(tiny_gf):
    rewritten = rewrite_global_filters(copy.deepcopy(tiny_gf), "matmul")
    with pytest.raises(ValueError, match="export again for this input size"):
        rewritten(torch.zeros(1, 3, 128, 128))


@pytest.fixture(scope="module")
def gf_bundle(tiny_gf, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    options = ExportOptions(fp16=True, reference="float64", batch=(1, 4, 16))
    manifest = export(tiny_gf, out, options)
    return out, manifest


def test_default_gf_graph_has_no_dft_and_matches_torch(tiny_gf, gf_bundle):
    out, manifest = gf_bundle
    ops = onnx_op_types(out / "model.onnx")
    assert "DFT" not in ops
    assert manifest.engines[0].gf_mode == "matmul"
    # channels-first norms exported fused; the reference they match is the unfused model
    assert "LayerNormalization" in ops and manifest.export["fused_layer_norms"] > 0
    assert not any(getattr(m, "fused", False) for m in tiny_gf.modules())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        images = _fresh_images(96, batch, seed=batch)
        got = session.run(None, {"image": images})[0]
        want = _torch_logits(tiny_gf, images)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        assert (got.argmax(1) == want.argmax(1)).all()


def test_circular_conv_graph_runs_on_openvino_as_on_torch(tiny_gf, tmp_path):
    """The circular-convolution form writes its wrap-padding as slices and concatenations
    (ONNX's Pad mode "wrap" does not import into OpenVINO): the service's OpenVINO engine
    runs the exported graph and answers as float64 torch does."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from service.engines import create_engine
    from service.settings import Settings

    export(tiny_gf, tmp_path, ExportOptions(gf_mode="circular_conv"))
    assert "Pad" not in onnx_op_types(tmp_path / "model.onnx")
    engine = create_engine(load_bundle(tmp_path), Settings(engine="openvino"))
    try:
        images = _fresh_images(96, 3, seed=7)
        got = engine.run({"image": images})["logits"]
    finally:
        engine.close()
    want = _torch_logits(tiny_gf, images)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


def test_manifest_records_contract_preprocessing_and_parity(gf_bundle):
    out, manifest = gf_bundle
    raw = json.loads((out / "manifest.json").read_text())
    assert Manifest.model_validate(raw) == manifest
    assert load_bundle(out).manifest == manifest
    (image,) = manifest.inputs
    assert (image.name, image.dtype, image.layout, image.shape) == (
        "image",
        "uint8",
        "NHWC",
        [-1, 96, 96, 3],
    )
    assert manifest.outputs[0].shape == [-1, 1000] and len(manifest.labels) == 1000
    pre = manifest.preprocess
    assert pre.normalize_in_graph and pre.interpolation == "bicubic" and pre.crop_pct == 0.875
    assert manifest.weights.random is True
    assert "RANDOM" in manifest.description
    fp32, fp16 = manifest.parity
    assert fp32.passed and fp32.reference == "torch float64" and fp32.relative_l2_error < 1e-5
    assert "photos: 4" in fp32.inputs and "random: 4" in fp32.inputs
    assert fp16.passed and fp16.relative_l2_error < 1e-2
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.tools)
    for name, entry in manifest.files.items():
        assert entry.bytes == (out / name).stat().st_size


def test_fp16_graph_keeps_io_types_and_norm_statistics_in_fp32(gf_bundle):
    out, manifest = gf_bundle
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model.fp16.onnx")))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    reduce_inputs = [types.get(n.input[0]) for n in model.graph.node if n.op_type == "ReduceMean"]
    assert reduce_inputs and all(t == onnx.TensorProto.FLOAT for t in reduce_inputs)
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert halves  # the weights really are fp16
    session = ort.InferenceSession(str(out / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    images = _fresh_images(96, 4, seed=9)
    got, want = session.run(None, {"image": images})[0], ref.run(None, {"image": images})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_dft_mode_keeps_the_onnx_dft_op_and_matches_torch(tiny_gf, tmp_path):
    manifest = export(tiny_gf, tmp_path, ExportOptions(gf_mode="dft"))
    assert "DFT" in onnx_op_types(tmp_path / "model.onnx") and manifest.engines[0].gf_mode == "dft"
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = _fresh_images(96, 2)
    got, want = session.run(None, {"image": images})[0], _torch_logits(tiny_gf, images)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_a_parity_failure_fails_the_export_and_is_recorded(tiny_gf, tmp_path, monkeypatch):
    monkeypatch.setattr(classify, "FP32_TOLERANCE", 1e-12)
    with pytest.raises(ExportError, match="parity check failed"):
        export(tiny_gf, tmp_path, ExportOptions(gf_mode="circular_conv"))
    manifest = load_bundle(tmp_path).manifest
    assert manifest.parity[0].passed is False


@pytest.mark.parametrize("damage", ["edit_engine", "wrong_sha", "missing_file"])
def test_a_corrupted_bundle_is_refused_by_the_loader(gf_bundle, tmp_path, damage):
    import shutil

    src, _ = gf_bundle
    out = tmp_path / "b"
    shutil.copytree(src, out)
    if damage == "edit_engine":
        data = bytearray((out / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (out / "model.onnx").write_bytes(bytes(data))
        match = "sha256 .* does not match"
    elif damage == "wrong_sha":
        raw = json.loads((out / "manifest.json").read_text())
        raw["files"]["model.onnx"]["sha256"] = "0" * 64
        (out / "manifest.json").write_text(json.dumps(raw))
        match = "does not match"
    else:
        (out / "model.fp16.onnx").unlink()
        match = "missing"
    with pytest.raises(BundleError, match=match):
        load_bundle(out)


def test_graph_normalises_uint8_pixels_inside(tiny_gf):
    graph = ClassifierGraph(tiny_gf, tiny_gf.pretrained_cfg.mean, tiny_gf.pretrained_cfg.std)
    images = _fresh_images(96, 2)
    with torch.no_grad():
        got = graph.double()(torch.from_numpy(images)).numpy()
    tiny_gf.float()
    want = _torch_logits(tiny_gf, images)  # float64 mean/std; the graph folds them to float32
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


# --------------------------------------------------------------------------- CLI


def _hornet(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model_export", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_exports_a_real_size_gf_variant_with_fp16(tmp_path):
    out = tmp_path / "t_gf"
    run = _hornet("export", "--variant", "hornet_t_gf", "--fp16", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RANDOM" in run.stderr  # said loudly
    assert "exporting ONNX" in run.stderr and "verifying" in run.stderr  # progress
    assert f"bundle {out}" in run.stdout and "parity model.fp16.onnx" in run.stdout  # summary
    manifest = load_bundle(out).manifest
    assert manifest.variant == "hornet_tiny_gf" and manifest.weights.random
    assert [e.precision for e in manifest.engines] == ["fp32", "fp16"]
    assert all(p.passed for p in manifest.parity)
    assert "DFT" not in onnx_op_types(out / "model.onnx")
    assert manifest.files["model.onnx"].bytes > 80e6  # 22.99M params


@pytest.mark.slow
def test_cli_tensorrt_without_tensorrt_fails_in_one_sentence_and_keeps_the_onnx_bundle(tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; the GPU test covers this path")
    except ImportError:
        pass
    out = tmp_path / "t7"
    run = _hornet(
        "export",
        "--variant",
        "hornet_small_7x7",
        "--image-size",
        "64",
        "--format",
        "all",
        "--batch",
        "1:2:4",
        "--out",
        str(out),
    )
    assert run.returncode == 1
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("hornet export: error:") and "tensorrt" in error and str(out) in error
    manifest = load_bundle(out).manifest
    assert manifest.variant == "hornet_small_7x7" and manifest.inputs[0].shape == [-1, 64, 64, 3]
    assert [e.format for e in manifest.engines] == ["onnx"] and manifest.parity[0].passed


def test_cli_reports_bad_arguments_with_a_non_zero_exit(tmp_path):
    run = _hornet("export", "--variant", "hornet_huge")
    assert run.returncode == 1 and "unknown variant 'hornet_huge'" in run.stderr
    assert "hornet_tiny_gf" in run.stderr
    run = _hornet("export", "--variant", "hornet_t_7x7", "--batch", "8:4:2")
    assert run.returncode == 2 and "MIN:OPT:MAX" in run.stderr
    run = _hornet("export", "--variant", "hornet_t_7x7", "--checkpoint", str(tmp_path / "nope.pth"))
    assert run.returncode == 1 and "does not exist" in run.stderr
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    for flags, said in [
        (["--image-size", "16"], "image size 16: HorNet downsamples its input 32 times"),
        (["--num-classes", "0"], "num_classes 0: a classifier needs at least one class"),
        (["--checkpoint", str(tmp_path / "notes.pth")], "not a torch checkpoint"),
    ]:
        # before: torch.export's report of a kernel larger than its input, a failure after
        # the export ("argmax of an empty sequence"), the unpickler's IndexError
        run = _hornet("export", "--variant", "hornet_t_7x7", "--out", str(tmp_path / "b"), *flags)
        assert run.returncode == 1 and said in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"image_size": 31}, "at least 32"),
        ({"image_size": 100_000}, "at most 2048"),  # GF filters of 100000/16 squared
        ({"num_classes": 0}, "at least one class"),
    ],
)
def test_a_variant_is_built_only_at_sizes_it_has(given, said):
    with pytest.raises(ValueError, match=said):
        create_model("hornet_tiny_gf", **TINY, **given)


# --------------------------------------------------------------------------- TensorRT (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_engine_matches_onnx_runtime(tiny_gf, tmp_path, fp16):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    from service.engines import TensorRTEngine

    options = ExportOptions(fp16=fp16, formats=("onnx", "tensorrt"), batch=(1, 4, 8))
    manifest = export(tiny_gf, tmp_path, options)
    entry = manifest.engine_for("tensorrt", "fp16" if fp16 else "fp32")
    assert entry.tensorrt_version and entry.gpu_name and entry.compute_capability
    engine = TensorRTEngine(tmp_path / entry.file, entry)
    images = _fresh_images(96, 3)
    got = engine.run({"image": images})["logits"]
    want = _torch_logits(tiny_gf, images)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < (1e-2 if fp16 else 1e-4)
