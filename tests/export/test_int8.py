"""int8 graphs (`hornet export --int8 --calibration DIR`): calibrated on the user's
images as the bundle preprocesses them, verified against the fp32 graph on ONNX Runtime
and OpenVINO, recorded in the manifest, failing under --min-agreement; and served at
`--precision int8` as ONNX Runtime itself runs the file."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import anyio
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from hornet_bundle import load_bundle
from hornet_bundle.preprocess import classification_input
from model_export import cli, create_model
from model_export.demo.shapes import generate_sample
from model_export.export import ExportOptions, ParityError, export, int8
from tests.helpers import bundles, demo
from tests.helpers.images import encode, upload
from tests.helpers.serving import serving

from ..models.conftest import TINY, randomize_

skimage_data = pytest.importorskip("skimage.data", reason="the photographs are scikit-image's")
CROP_SOURCES = ("cat", "coffee", "immunohistochemistry", "colorwheel", "rocket")
MIN_AGREEMENT = 0.8


def _photo_crops(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` PNG crops (random position and size) of scikit-image colour photographs."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sources = [np.asarray(getattr(skimage_data, name)()) for name in CROP_SOURCES]
    for i in range(count):
        image = sources[i % len(sources)]
        h, w = image.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        Image.fromarray(image[y : y + side, x : x + side]).save(folder / f"crop{i:03d}.png")
    return folder


def _black_images(folder: Path, count: int = 10) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (80, 80)).save(folder / f"black{i}.png")
    return folder


def _shapes(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image, _ = generate_sample(rng, int(rng.integers(64, 160)), int(rng.integers(64, 160)))
        Image.fromarray(image).save(folder / f"shape{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    return _photo_crops(tmp_path_factory.mktemp("calibration") / "crops", 20)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return _shapes(tmp_path_factory.mktemp("calibration") / "shapes", 20, seed=5)


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory, shapes) -> Path:
    """The demo classifier (trained, 96 px) with an int8 graph calibrated on 20 generated
    shapes. The bound is lowered: the four photographs are no shapes, their fp32 logits
    nearly tie, and OpenVINO's int8 flips one of them (a random-weight network ties
    everywhere: no test of agreement at all)."""
    bundle_dir = tmp_path_factory.mktemp("int8") / "demo"
    shutil.copytree(demo.bundle_dir("classify"), bundle_dir)
    int8.quantize_int8(bundle_dir, shapes, min_agreement=MIN_AGREEMENT)
    return bundle_dir


def _int8_records(bundle_dir: Path) -> list:
    return [p for p in load_bundle(bundle_dir).manifest.parity if p.precision == "int8"]


def test_quantizing_writes_a_verified_int8_engine_and_its_calibration(tiny_int8, shapes) -> None:
    manifest = load_bundle(tiny_int8).manifest  # the new file is hashed with the others
    assert [(e.file, e.precision) for e in manifest.engines] == [
        ("model.onnx", "fp32"),
        ("model.int8.onnx", "int8"),
    ]
    assert "int8" in manifest.verified_precisions()
    calibration = manifest.export["int8"]["calibration"]
    assert (calibration["images"], calibration["calibrated_on"], calibration["held_out"]) == (
        20,
        16,
        4,
    )
    again, sha = int8.calibration_set(shapes, manifest)
    assert calibration["sha256"] == sha and len(again) == 20


def test_every_runtime_records_agreement_and_error_on_photos_and_held_out_images(
    tiny_int8,
) -> None:
    records = _int8_records(tiny_int8)
    runtimes = [r.runtime.split()[0] for r in records]
    expected = ["onnxruntime", "openvino"] if _has_openvino() else ["onnxruntime"]
    assert runtimes == expected
    for record in records:
        assert record.passed and record.engine == "model.int8.onnx"
        assert record.reference == "onnxruntime fp32 model.onnx"
        assert record.top1_agreement >= record.min_top1_agreement == MIN_AGREEMENT
        assert 0 < record.relative_l2_error < int8.INT8_TOLERANCE
        assert "photos: 4" in record.inputs and "held-out calibration images: 4" in record.inputs


def test_int8_logits_are_int8_not_a_copy_of_fp32(tiny_int8) -> None:
    """The recorded error is the quantized graph's: it holds QDQ nodes and differs."""
    import onnx

    ops = {node.op_type for node in onnx.load(str(tiny_int8 / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert min(r.relative_l2_error for r in _int8_records(tiny_int8)) > 1e-4


def test_agreement_under_the_bound_fails_and_is_recorded_as_failed(tmp_path) -> None:
    """Calibrated on black images, the activation ranges exclude everything brighter:
    the photographs' classes change."""
    bundle_dir = bundles.write_classifier(tmp_path / "cls", size=64)
    with pytest.raises(ParityError, match=r"top-1 agreement 0\.\d+ \(--min-agreement 0\.99\)"):
        int8.quantize_int8(bundle_dir, _black_images(tmp_path / "black"))
    records = _int8_records(bundle_dir)
    assert records and not any(r.passed for r in records)
    assert all(r.top1_agreement < 0.99 for r in records)
    assert "int8" not in load_bundle(bundle_dir).manifest.verified_precisions()


def test_a_lower_bound_accepts_what_the_default_refuses(tmp_path) -> None:
    bundle_dir = bundles.write_classifier(tmp_path / "cls", size=64)
    black = _black_images(tmp_path / "black")
    with pytest.raises(ParityError):
        int8.quantize_int8(bundle_dir, black)
    (worst,) = {min(r.top1_agreement for r in _int8_records(bundle_dir))}
    int8.quantize_int8(bundle_dir, black, min_agreement=worst)
    assert "int8" in load_bundle(bundle_dir).manifest.verified_precisions()


@pytest.mark.parametrize("bound", [-0.1, 1.01])
def test_a_bound_outside_0_to_1_is_refused(tmp_path, crops, bound) -> None:
    bundle_dir = bundles.write_classifier(tmp_path / "cls", size=64)
    with pytest.raises(ValueError, match="between 0 and 1"):
        int8.quantize_int8(bundle_dir, crops, min_agreement=bound)
    assert not (bundle_dir / "model.int8.onnx").exists()


def test_too_few_calibration_images_are_refused(tmp_path) -> None:
    bundle_dir = bundles.write_classifier(tmp_path / "cls", size=64)
    with pytest.raises(ValueError, match="holds 9 images .* at least 10"):
        int8.quantize_int8(bundle_dir, _black_images(tmp_path / "few", 9))


def test_an_unreadable_calibration_image_is_named(tmp_path, crops) -> None:
    folder = Path(shutil.copytree(crops, tmp_path / "crops"))
    (folder / "broken.jpg").write_bytes(b"not an image")
    bundle_dir = bundles.write_classifier(tmp_path / "cls", size=64)
    with pytest.raises(ValueError, match="broken.jpg cannot be read"):
        int8.quantize_int8(bundle_dir, folder)


def test_dense_bundles_are_refused_with_the_reason(tmp_path, crops) -> None:
    with pytest.raises(ValueError, match="int8 export is for classifiers only; this is a segment"):
        int8.quantize_int8(bundles.write_segmenter(tmp_path / "seg"), crops)


def test_export_with_int8_writes_the_int8_graph(tmp_path, crops) -> None:
    model = randomize_(create_model("hornet_tiny_7x7", **TINY, image_size=64), seed=3)
    options = ExportOptions(int8_calibration=crops, min_agreement=0.0)
    manifest = export(model, tmp_path / "bundle", options)
    assert [e.precision for e in manifest.engines] == ["fp32", "int8"]
    assert manifest.engine_for("onnx", "int8").batch_profile == (1, 8, 32)
    assert load_bundle(tmp_path / "bundle").manifest == manifest


def test_export_refuses_int8_for_a_segmenter_before_writing(tmp_path, crops) -> None:
    model = create_model("upernet_hornet_tiny_7x7", **TINY)
    with pytest.raises(ValueError, match="classifiers only"):
        export(model, tmp_path / "seg", ExportOptions(int8_calibration=crops))
    assert not (tmp_path / "seg").exists()


def test_export_cli_needs_calibration_with_int8(tmp_path, capsys) -> None:
    parser = cli.export_parser(argparse.ArgumentParser())
    args = parser.parse_args(["--variant", "hornet_tiny_7x7", "--int8", "--out", str(tmp_path)])
    assert cli.export_variant(args) == 1
    assert "--int8 and --calibration DIR go together" in capsys.readouterr().err
    args = parser.parse_args(
        ["--variant", "hornet_tiny_7x7", "--int8", "--calibration", "d", "--min-agreement", "0.9"]
    )
    assert (args.int8, args.calibration, args.min_agreement) == (True, Path("d"), 0.9)


def test_served_int8_answer_is_onnx_runtimes_run_of_the_int8_file(tiny_int8) -> None:
    manifest = load_bundle(tiny_int8).manifest
    image = np.asarray(skimage_data.chelsea())
    crop = classification_input(Image.fromarray(image), manifest.preprocess)
    session = ort.InferenceSession(str(tiny_int8 / "model.int8.onnx"))
    logits = session.run(None, {"image": crop[None]})[0][0].astype(np.float64)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    async def classify() -> dict:
        async with serving([tiny_int8], precision="int8") as client:
            response = await client.post("/classify?top_k=10", files=upload(encode(image)))
            assert response.status_code == 200, response.text
            return response.json()

    body = anyio.run(classify)
    scores = {s["index"]: s["score"] for s in body["results"][0]["top_k"]}
    assert len(scores) == len(expected) == 3
    np.testing.assert_allclose([scores[i] for i in range(3)], expected, rtol=1e-5, atol=1e-7)


def _has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def test_openvino_runs_the_int8_graph_as_onnx_runtime_does(tiny_int8) -> None:
    """The same QDQ graph on both runtimes, within a few of the output's quantization steps
    (they round intermediate values apart): 7-bit weights keep OpenVINO's int8 kernels on
    this AVX2 CPU from saturating (with 8-bit ones its logits drifted 0.3-0.7 relative).
    On 16 new shapes (measured: 0.4% relative, one output step at most); not on
    photographs, whose logits nearly tie near zero, where one step is 4% of the norm."""
    pytest.importorskip("openvino")
    from service.engines import openvino_engine

    bundle = load_bundle(tiny_int8)
    rng = np.random.default_rng(11)
    x = np.stack(
        [
            classification_input(
                Image.fromarray(generate_sample(rng, *rng.integers(64, 160, size=2))[0]),
                bundle.manifest.preprocess,
            )
            for _ in range(16)
        ]
    )
    engine = openvino_engine(bundle, precision="int8")
    assert engine.description.endswith("int8 model.int8.onnx")
    got = engine.run({"image": x})["logits"]
    want = ort.InferenceSession(str(tiny_int8 / "model.int8.onnx")).run(None, {"image": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-2
    assert (got.argmax(1) == want.argmax(1)).all()


def test_demo_classifier_keeps_its_answers_in_int8(tmp_path) -> None:
    """The trained demo classifier, calibrated on 100 generated shapes: 0.99 of 200 new
    ones keep their fp32 class (measured 0.995), and the int8 answers are within a point
    of fp32's accuracy. The export's own check (held-out shapes and the photographs) is
    recorded with a bound of 0.9: one held-out shape of 20 flips."""
    bundle_dir = Path(shutil.copytree(demo.bundle_dir("classify"), tmp_path / "demo"))
    calibration = _shapes(tmp_path / "calibration", 100, seed=5)
    manifest = int8.quantize_int8(bundle_dir, calibration, min_agreement=0.9)
    assert all(r.passed for r in manifest.parity if r.precision == "int8")
    rng = np.random.default_rng(2026)
    samples = [generate_sample(rng, 96, 96) for _ in range(200)]
    x = np.stack(
        [classification_input(Image.fromarray(s), manifest.preprocess) for s, _ in samples]
    )
    labels = np.array([label for _, label in samples])
    fp32 = ort.InferenceSession(str(bundle_dir / "model.onnx")).run(None, {"image": x})[0]
    q = ort.InferenceSession(str(bundle_dir / "model.int8.onnx")).run(None, {"image": x})[0]
    assert (fp32.argmax(1) == q.argmax(1)).mean() >= 0.99
    assert (q.argmax(1) == labels).mean() >= (fp32.argmax(1) == labels).mean() - 0.01


def test_openvino_rewrites_the_int8_graphs_norms_and_keeps_its_int8_weights(tiny_int8) -> None:
    """The OpenVINO engine's LayerNorm rewrite (service.engines.unfuse_channel_norms)
    reaches the int8 graph's norms but leaves the weights' dequantization (Convert from
    int8 constants) as it was: folding it to fp32 constants ran 3x slower."""
    if not _has_openvino():
        pytest.skip("the openvino extra is not installed")
    import openvino as ov

    from service.engines import unfuse_channel_norms

    def int8_weight_converts(model) -> int:
        return sum(
            op.get_type_name() == "Convert"
            and op.input_value(0).get_node().get_type_name() == "Constant"
            and op.input_value(0).get_element_type() in (ov.Type.i8, ov.Type.u8)
            for op in model.get_ordered_ops()
        )

    model = ov.Core().read_model(str(tiny_int8 / "model.int8.onnx"))
    before = int8_weight_converts(model)
    rewritten = unfuse_channel_norms(model)
    assert rewritten == load_bundle(tiny_int8).manifest.export["fused_layer_norms"] > 0
    assert int8_weight_converts(model) == before > 0
