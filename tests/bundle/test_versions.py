"""Manifests of schema version 1 (the three demo bundles' as shipped until 2026-12-02,
kept in tests/bundle/data) still load, read as version 2; a version this reader does not
know is refused, naming what it reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hornet_bundle import SCHEMA_VERSION, BundleError, Manifest, load_bundle

DEMO_BUNDLES = Path(__file__).resolve().parents[2] / "service" / "demo_bundles"
V1_MANIFESTS = {
    task: Path(__file__).parent / "data" / f"shapes_{task}_v1_manifest.json"
    for task in ("classify", "segment", "detect")
}


def _v1(task: str) -> dict:
    raw = json.loads(V1_MANIFESTS[task].read_text())
    assert raw["schema_version"] == 1  # the shipped form this test guards
    return raw


def test_a_version_1_classifier_reads_its_relative_error_as_relative_l2_error() -> None:
    raw = _v1("classify")
    (parity,) = Manifest.model_validate(raw).parity
    assert parity.metric == "relative_l2_error"
    assert parity.relative_l2_error == raw["parity"][0]["relative_error"]
    assert parity.top1_agreement == raw["parity"][0]["top1_agreement"]
    assert parity.value == parity.relative_l2_error


def test_a_version_1_segmenter_reads_max_relative_error_and_pixel_agreement() -> None:
    raw = _v1("segment")
    manifest = Manifest.model_validate(raw)
    (parity,) = manifest.parity
    assert parity.metric == "max_relative_error" and parity.top1_agreement is None
    assert parity.max_relative_error == raw["parity"][0]["relative_error"]
    assert parity.pixel_agreement == raw["parity"][0]["top1_agreement"]
    assert manifest.export["batch"] == [1, 8, 64] and "max_batch" not in manifest.export


def test_a_version_1_detector_reads_box_score_error_and_pairing() -> None:
    raw = _v1("detect")
    (parity,) = Manifest.model_validate(raw).parity
    assert parity.metric == "box_score_error"
    assert parity.box_score_error == raw["parity"][0]["relative_error"]
    assert parity.detections_paired is True


def test_a_copied_version_1_bundle_loads_as_the_current_version(tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(DEMO_BUNDLES / "shapes_segment", tmp_path / "seg"))
    manifest = load_bundle(bundle).manifest
    assert manifest.schema_version == SCHEMA_VERSION == 2
    assert manifest.name == "shapes_segment" and manifest.engines[0].file == "model.onnx"


def test_a_version_1_fp16_graph_keeps_its_file_name() -> None:
    raw = _v1("segment")
    raw["engines"].append(raw["engines"][0] | {"precision": "fp16", "file": "model_fp16.onnx"})
    raw["files"]["model_fp16.onnx"] = raw["files"]["model.onnx"]
    manifest = Manifest.model_validate(raw)
    assert manifest.engine_for("onnx", "fp16").file == "model_fp16.onnx"


def test_reading_leaves_the_raw_manifest_unchanged() -> None:
    raw = _v1("classify")
    before = json.dumps(raw, sort_keys=True)
    Manifest.model_validate(raw)
    assert json.dumps(raw, sort_keys=True) == before


def test_an_unknown_schema_version_is_refused_naming_the_versions_read(tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(DEMO_BUNDLES / "shapes_classify", tmp_path / "cls"))
    raw = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(raw | {"schema_version": 3}))
    with pytest.raises(BundleError, match="schema_version 3 cannot be read here.*versions 1, 2"):
        load_bundle(bundle)


def test_a_parity_record_must_carry_the_metric_it_names() -> None:
    raw = _v1("classify")
    raw["schema_version"] = 2
    raw["parity"][0] |= {"metric": "max_relative_error"}
    raw["parity"][0]["relative_l2_error"] = raw["parity"][0].pop("relative_error")
    with pytest.raises(ValueError, match="parity metric 'max_relative_error' has no value"):
        Manifest.model_validate(raw)
