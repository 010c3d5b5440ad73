"""Verifying a bundle at bf16 (`hornet verify`, `hornet export --verify-precision`): the
figures against the fp32 graph go into the manifest, consistently hashed, and a failure
fails the command and is recorded as failed.

Where the CPU has no bf16 arithmetic the engine is replaced by an emulation: ONNX
Runtime fp32 with every float output rounded to bf16, which exercises everything but
OpenVINO's bf16 kernels; the real engine is checked where the CPU has them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from hornet_bundle import Bundle, load_bundle
from hornet_bundle.host import cpu_model, runtime_cpu
from model_export import cli, create_model
from model_export.export import ExportError, ExportOptions, ParityError, export, precision
from tests.helpers import bundles, demo

from ..models.conftest import TINY, randomize_

pytest.importorskip("skimage", reason="the verification photographs come from scikit-image")


def _to_bf16(array: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bf16 (8 significant bits), as float32."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32)


class EmulatedBf16:
    """The bundle's fp32 graph on ONNX Runtime, float outputs rounded to bf16, plus
    `noise` times each output's largest magnitude (a broken engine)."""

    description = "emulated bf16 (ONNX Runtime fp32, outputs rounded)"

    def __init__(self, bundle: Bundle, noise: float = 0.0) -> None:
        path = bundle.file(bundle.manifest.engine_for("onnx", "fp32").file)
        self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self._names = [o.name for o in self._session.get_outputs()]
        self._noise = noise

    def run(self, inputs: dict) -> dict:
        outputs = dict(zip(self._names, self._session.run(None, dict(inputs)), strict=True))
        rng = np.random.default_rng(0)
        for name, value in outputs.items():
            if value.dtype == np.float32 and value.size:
                scale = self._noise * np.abs(value).max()
                outputs[name] = _to_bf16(value + scale * rng.standard_normal(value.shape))
        return outputs

    def close(self) -> None:
        self._session = None


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(precision, "precision_engine", lambda bundle, _: EmulatedBf16(bundle))


@pytest.fixture
def broken(monkeypatch):
    monkeypatch.setattr(
        precision, "precision_engine", lambda bundle, _: EmulatedBf16(bundle, noise=0.3)
    )


WRITERS = {
    "classify": bundles.write_classifier,
    "segment": bundles.write_segmenter,
    "detect": bundles.write_detector,
}


@pytest.mark.parametrize("task", sorted(WRITERS))
def test_verify_records_bf16_figures_in_a_manifest_that_still_loads(task, tmp_path, emulated):
    bundle_dir = WRITERS[task](tmp_path / task)
    assert "bf16" not in load_bundle(bundle_dir).manifest.verified_precisions()
    precision.verify_precision(bundle_dir, "bf16")
    manifest = load_bundle(bundle_dir).manifest  # files re-hashed consistently
    (record,) = [p for p in manifest.parity if p.precision == "bf16"]
    assert record.passed and record.engine == "model.onnx"
    assert record.reference == "onnxruntime fp32 model.onnx"
    assert record.runtime.startswith("emulated bf16")
    assert runtime_cpu(record.runtime) == cpu_model()  # what the server compares
    assert 0 < record.value < precision.TOLERANCES[task]
    assert "bf16" in manifest.verified_precisions()


def test_classifier_record_has_the_top1_agreement_and_names_the_photos(tmp_path, emulated):
    bundle_dir = bundles.write_classifier(tmp_path / "cls")
    manifest = precision.verify_precision(bundle_dir, "bf16")
    (record,) = [p for p in manifest.parity if p.precision == "bf16"]
    assert record.top1_agreement == 1.0 and record.relative_l2_error < 2e-2
    assert "photos: 4" in record.inputs and "top-1 agreement on the photos 1.000" in record.inputs


def test_verifying_again_replaces_the_earlier_record(tmp_path, emulated):
    bundle_dir = bundles.write_classifier(tmp_path / "cls")
    precision.verify_precision(bundle_dir, "bf16")
    manifest = precision.verify_precision(bundle_dir, "bf16")
    assert [p.precision for p in manifest.parity] == ["bf16"]


def test_only_the_verified_record_writes_precision_and_runtime(tmp_path, emulated):
    """Records without them read as before in a hornet-serve that predates the fields."""
    bundle_dir = bundles.write_classifier(tmp_path / "cls")
    raw = json.loads((bundle_dir / "manifest.json").read_text())
    raw["parity"] = [
        {"engine": "model.onnx", "reference": "torch float32", "metric": "relative_l2_error",
         "tolerance": 1e-5, "passed": True, "max_abs_error": 0.0, "relative_l2_error": 0.0}
    ]  # fmt: skip
    raw["schema_version"] = 2  # the record above is written in version 2's names
    (bundle_dir / "manifest.json").write_text(json.dumps(raw))
    precision.verify_precision(bundle_dir, "bf16")
    written = json.loads((bundle_dir / "manifest.json").read_text())["parity"]
    assert [("precision" in r, "runtime" in r) for r in written] == [(False, False), (True, True)]


def test_a_failed_verification_raises_and_is_recorded_as_failed(tmp_path, broken):
    bundle_dir = bundles.write_classifier(tmp_path / "cls")
    with pytest.raises(ParityError, match="parity check failed"):
        precision.verify_precision(bundle_dir, "bf16")
    manifest = load_bundle(bundle_dir).manifest
    assert [p.passed for p in manifest.parity if p.precision == "bf16"] == [False]
    assert "bf16" not in manifest.verified_precisions()


def _verify_args(bundle_dir: Path, *more: str) -> argparse.Namespace:
    """`hornet verify BUNDLE --precision bf16 ...` as its own parser reads it."""
    parser = cli.verify_parser(argparse.ArgumentParser())
    return parser.parse_args([str(bundle_dir), "--precision", "bf16", *more])


def test_hornet_verify_exits_0_and_prints_the_record(tmp_path, emulated, capsys):
    bundle_dir = bundles.write_segmenter(tmp_path / "seg")
    assert cli.verify_bundle(_verify_args(bundle_dir)) == 0
    out = capsys.readouterr().out
    assert "bf16 verified" in out and "max_relative_error" in out


def test_hornet_verify_fails_in_one_line_beyond_tolerance(tmp_path, broken, capsys):
    assert cli.verify_bundle(_verify_args(bundles.write_classifier(tmp_path / "cls"))) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hornet verify: error: parity check failed") and "\n" not in err


def test_export_with_verify_precision_records_bf16_in_the_manifest(tmp_path, emulated):
    model = randomize_(create_model("hornet_tiny_7x7", **TINY, image_size=64), seed=3)
    manifest = export(model, tmp_path, ExportOptions(verify_precisions=("bf16",)))
    assert [(p.precision, p.passed) for p in manifest.parity] == [(None, True), ("bf16", True)]
    assert load_bundle(tmp_path).manifest == manifest


def test_export_cli_passes_verify_precision_to_the_export_options() -> None:
    parser = cli.export_parser(argparse.ArgumentParser())
    args = parser.parse_args(["--variant", "hornet_tiny_7x7", "--verify-precision", "bf16"])
    assert args.verify_precision == ["bf16"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--variant", "hornet_tiny_7x7", "--verify-precision", "fp16"])


def test_an_unknown_precision_is_refused_before_anything_is_exported(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot verify precisions"):
        export("hornet_tiny_7x7", tmp_path, ExportOptions(verify_precisions=("int8",)))
    assert not any(tmp_path.iterdir())


def test_without_bf16_arithmetic_the_verification_says_why(tmp_path, monkeypatch) -> None:
    from service import engines

    pytest.importorskip("openvino")
    monkeypatch.setattr(engines, "cpu_runs_bf16", lambda: False)
    bundle_dir = bundles.write_classifier(tmp_path / "cls")
    with pytest.raises(ExportError, match="bf16 cannot be verified here: .*AVX512_BF16"):
        precision.verify_precision(bundle_dir, "bf16")


def test_demo_classifier_verifies_at_bf16_on_openvino(tmp_path) -> None:
    from service.engines import cpu_runs_bf16

    pytest.importorskip("openvino")
    if not cpu_runs_bf16():
        pytest.skip("this CPU has no bf16 arithmetic (AVX512_BF16 or AMX-BF16)")
    bundle_dir = Path(shutil.copytree(demo.bundle_dir("classify"), tmp_path / "demo"))
    manifest = precision.verify_precision(bundle_dir, "bf16")
    (record,) = [p for p in manifest.parity if p.precision == "bf16"]
    assert record.passed and record.relative_l2_error < 2e-2
    assert record.runtime.startswith("openvino ")


# --- detection: the detections /detect answers by default must stay as they are -----------


def _detections(*rows: tuple) -> list[np.ndarray]:
    """(x1, y1, x2, y2, label, score) rows as a detector's outputs (masks of ones)."""
    boxes = np.array([row[:4] for row in rows], np.float32).reshape(-1, 4)
    labels = np.array([row[4] for row in rows], np.int64)
    scores = np.array([row[5] for row in rows], np.float32)
    return [boxes, labels, scores, np.ones((len(rows), 1, 8, 8), np.float32)]


TOL = precision.TOLERANCES["detect"]


def test_the_answer_threshold_is_the_services_default() -> None:
    from service.pipelines import AnswerOptions

    assert precision.ANSWER_SCORE == AnswerOptions().score_threshold


def test_detections_under_the_answer_threshold_may_come_and_go() -> None:
    ref = _detections((10, 10, 100, 100, 1, 0.9), (5, 5, 50, 50, 2, 0.2), (0, 0, 9, 9, 0, 0.06))
    got = _detections((10, 10, 100.5, 100, 1, 0.89), (60, 60, 90, 90, 0, 0.3))
    pairs, problems = precision.answered_pairs(ref, got, TOL)
    assert pairs == [(0, 0)] and problems == []


def test_an_answered_detection_pairs_across_the_threshold() -> None:
    """0.51 in one run and 0.49 in the other is the same detection, not a lost one."""
    ref = _detections((10, 10, 100, 100, 1, 0.51), (200, 10, 300, 100, 2, 0.95))
    got = _detections((200, 10, 300, 101, 2, 0.94), (10, 11, 100, 100, 1, 0.49))
    pairs, problems = precision.answered_pairs(ref, got, TOL)
    assert pairs == [(0, 1), (1, 0)] and problems == []


@pytest.mark.parametrize(
    ("got_rows", "expected"),
    [
        ([], "fp32 label 1 at [10, 10, 100, 100] (score 0.90) has no counterpart"),
        ([(10, 10, 100, 100, 2, 0.9)], "fp32 label 1"),  # the label changed
        ([(10, 30, 100, 100, 1, 0.9)], "fp32 label 1"),  # the box moved 20 px of 300
        ([(10, 10, 100, 100, 1, 0.9), (200, 200, 300, 300, 0, 0.7)], "the candidate's label 0"),
    ],
    ids=["lost", "label", "box", "extra"],
)
def test_an_answered_detection_without_its_counterpart_fails(got_rows, expected) -> None:
    ref = _detections((10, 10, 100, 100, 1, 0.9), (0, 0, 300, 300, 2, 0.3))
    pairs, problems = precision.answered_pairs(ref, _detections(*got_rows), TOL)
    # (a changed label or moved box is also the candidate's answer without a counterpart)
    assert problems and problems[0].startswith(expected), problems


def test_a_detector_that_answers_nothing_is_not_verified(tmp_path, monkeypatch) -> None:
    """Nothing scored 0.5 or more in either run: nothing was compared, so nothing passes."""
    quiet = _detections((10, 10, 50, 50, 0, 0.3))
    pictures = precision.Pictures([], "photos")
    figures, inputs, passed = precision._detect(None, lambda _: quiet, lambda _: quiet, pictures)
    assert not passed and not figures["detections_paired"]
    assert "no detection scored 0.5 or more" in inputs


def test_the_demo_detectors_answers_stay_at_bf16_on_its_own_scenes() -> None:
    """OpenVINO bf16 against ONNX Runtime fp32 on scenes like those it was trained on:
    every answered detection keeps its label and box (the full lists, down to the
    graph's 0.05, differed in 12 of 30 such scenes when this was written)."""
    from model_export.demo.shapes import generate_scene
    from service.engines import cpu_runs_bf16

    pytest.importorskip("openvino")
    if not cpu_runs_bf16():
        pytest.skip("this CPU has no bf16 arithmetic (AVX512_BF16 or AMX-BF16)")
    bundle = load_bundle(demo.bundle_dir("detect"))
    names = [output.name for output in bundle.manifest.outputs]
    image_name = bundle.manifest.inputs[0].name
    session = ort.InferenceSession(
        str(bundle.file("model.onnx")), providers=["CPUExecutionProvider"]
    )
    engine = precision.precision_engine(bundle, "bf16")
    rng = np.random.default_rng(5)
    compared = 0
    for _ in range(10):
        image = generate_scene(rng, 240, 320).image
        ref = session.run(names, {image_name: image})
        got = engine.run({image_name: image})
        pairs, problems = precision.answered_pairs(ref, [got[n] for n in names], TOL)
        assert problems == []
        compared += len(pairs)
    assert compared >= 10


# --- verifying on the user's own images (--images DIR, --verify-images DIR) ---------------


def _image_folder(folder: Path, images: list[np.ndarray]) -> Path:
    """`images` written as PNG and JPEG files in nested folders, and a file that is not
    an image."""
    from PIL import Image

    (folder / "nested").mkdir(parents=True)
    for index, image in enumerate(images):
        where = folder / ("nested" if index % 2 else ".")
        suffix = ".png" if index % 2 else ".jpg"
        Image.fromarray(image).save(where / f"{index:02d}{suffix}")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_hornet_verify_on_a_folder_of_images_names_them_in_the_record(
    tmp_path, emulated, capsys
) -> None:
    rng = np.random.default_rng(1)
    folder = _image_folder(
        tmp_path / "mine", [rng.integers(0, 256, (90, 120, 3), np.uint8) for _ in range(3)]
    )
    bundle_dir = bundles.write_classifier(tmp_path / "cls")
    assert cli.verify_bundle(_verify_args(bundle_dir, "--images", str(folder))) == 0
    (record,) = [p for p in load_bundle(bundle_dir).manifest.parity if p.precision == "bf16"]
    assert record.passed
    assert f"images of {folder}: 3;" in record.inputs and "photos" not in record.inputs


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_a_folder_without_images_is_refused_before_anything_runs(tmp_path, kind) -> None:
    folder = tmp_path / "pictures"
    if kind == "empty":
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
    bundle_dir = bundles.write_classifier(tmp_path / "cls")
    with pytest.raises(ValueError, match="image folder .*pictures"):
        precision.verify_precision(bundle_dir, "bf16", images=folder)
    assert "bf16" not in load_bundle(bundle_dir).manifest.verified_precisions()


def test_export_passes_verify_images_and_needs_a_precision_with_them(tmp_path) -> None:
    parser = cli.export_parser(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--variant", "v", "--verify-precision", "bf16", "--verify-images", str(tmp_path)]
    )
    assert args.verify_images == tmp_path
    with pytest.raises(ValueError, match="verify_images needs a precision"):
        export("hornet_tiny_7x7", tmp_path / "out", ExportOptions(verify_images=tmp_path))
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    options = ExportOptions(verify_precisions=("bf16",), verify_images=empty)
    with pytest.raises(ValueError, match="holds no images"):
        export("hornet_tiny_7x7", tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_the_demo_detector_verifies_at_bf16_on_its_own_kind_of_image(tmp_path) -> None:
    """On the photographs OpenVINO's bf16 changes what the demo detector answers (it was
    trained on synthetic shapes, and they are nothing like them: refused); on scenes
    like its training images it passes, so `hornet serve` serves it at bf16."""
    from model_export.demo.shapes import generate_scene
    from service.engines import cpu_runs_bf16

    pytest.importorskip("openvino")
    if not cpu_runs_bf16():
        pytest.skip("this CPU has no bf16 arithmetic (AVX512_BF16 or AMX-BF16)")
    rng = np.random.default_rng(11)
    scenes = [generate_scene(rng, 240, 320).image for _ in range(8)]
    folder = _image_folder(tmp_path / "scenes", scenes)
    bundle_dir = Path(shutil.copytree(demo.bundle_dir("detect"), tmp_path / "detect"))
    manifest = precision.verify_precision(bundle_dir, "bf16", images=folder)
    (record,) = [p for p in manifest.parity if p.precision == "bf16"]
    assert record.passed and record.detections_paired and record.box_score_error < 2e-2
    assert f"images of {folder}" in record.inputs
    assert "bf16" in load_bundle(bundle_dir).manifest.verified_precisions()


def test_pictures_are_read_upright_as_the_service_reads_uploads(tmp_path) -> None:
    """A phone's JPEG stored sideways with EXIF orientation 6 is verified (and calibrated
    on, int8) turned upright, as `hornet serve` turns an upload of it."""
    from PIL import Image

    from service.imaging import decode_image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    picture = np.asarray(precision.read_picture(path))
    served = np.asarray(decode_image(path.read_bytes(), 10_000).image.convert("RGB"))
    assert picture.shape == served.shape == (40, 20, 3)
    assert np.abs(picture.astype(int) - served).max() <= 1
