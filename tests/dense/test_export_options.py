"""The dense exporters' options: custom class counts and labels, fp16, Global Filter
graphs for detection, and clear refusals of what they do not support."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch

from model_export import create_model
from model_export.export import ExportOptions, export
from model_export.export.detect import detection_preprocess
from model_export.export.segment import export_segmentation
from model_export.gnconv import GlobalLocalFilter
from model_export.separable_dft import SeparableDFTBranch
from tests.helpers.dense_tiny import TINY_DET, TINY_SEG, randomize_

TILE = 128
SHAPES_SEG = ["background", "circle", "square", "triangle"]
SHAPES_DET = ["circle", "square", "triangle"]


def _seg_model(name: str = "upernet_hornet_tiny_7x7", **kwargs):
    return randomize_(create_model(name, image_size=TILE, **(TINY_SEG | kwargs)), seed=2)


def _det_model(name: str = "mask_rcnn_hornet_tiny_7x7", **kwargs):
    model = create_model(name, box_score_thresh=0.0, **(TINY_DET | kwargs))
    return randomize_(model, seed=3, gamma=0.1)


@pytest.fixture(scope="module")
def gf_detection_bundle(tmp_path_factory):
    """A 3-class GF detector with HorFPN GF fusion, exported with its own labels."""
    out = tmp_path_factory.mktemp("gf_det")
    model = _det_model("horfpn_gf_mask_rcnn_hornet_tiny_gf", num_classes=3)
    options = ExportOptions(labels=SHAPES_DET, image_sizes=((120, 160), (100, 90)))
    manifest = export(model, out, options)
    return out, manifest


@pytest.mark.parametrize("size", [(14, 14), (25, 38), (7, 9), (1, 1), (2, 3)])
def test_separable_dft_branch_equals_the_fft_global_branch(size) -> None:
    layer = GlobalLocalFilter(8, h=14, w=8)
    with torch.no_grad():
        layer.complex_weight.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = layer.global_branch(x)
        got = SeparableDFTBranch(layer.complex_weight)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_gf_detection_bundle_matches_torch_at_every_image_size(gf_detection_bundle) -> None:
    _, manifest = gf_detection_bundle
    parity = manifest.parity[0]
    assert parity.passed and parity.detections_paired == 1.0 and "100x90" in parity.inputs
    assert manifest.engines[0].gf_mode == "matmul"


def test_gf_detection_graph_has_no_dft_op(gf_detection_bundle) -> None:
    out, _ = gf_detection_bundle
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert "DFT" not in ops and "MatMul" in ops


def test_detection_labels_come_from_the_labels_argument(gf_detection_bundle) -> None:
    _, manifest = gf_detection_bundle
    assert manifest.labels == SHAPES_DET


def test_detection_preprocess_records_the_models_resize() -> None:
    model = create_model("mask_rcnn_hornet_tiny_7x7", **TINY_DET)
    pre = detection_preprocess(model.pretrained_cfg, model)
    assert pre["input_size"] == (160, 224) and pre["scale"] == (224, 160)


def test_tiny_segmentor_with_four_classes_exports_its_labels(tmp_path) -> None:
    model = _seg_model(num_classes=4)
    manifest = export(model, tmp_path, ExportOptions(labels=SHAPES_SEG, name="shapes"))
    assert manifest.labels == SHAPES_SEG and manifest.name == "shapes"
    assert manifest.outputs[0].shape == [-1, 4, TILE, TILE] and manifest.parity[0].passed


def test_labels_stored_on_the_pretrained_cfg_are_used(tmp_path) -> None:
    model = _seg_model(num_classes=4)
    cfg = model.pretrained_cfg
    model.pretrained_cfg = dataclasses.replace(cfg, extra=cfg.extra | {"labels": SHAPES_SEG})
    assert export(model, tmp_path).labels == SHAPES_SEG


def test_overridden_class_count_without_labels_gets_numbered_names(tmp_path) -> None:
    manifest = export(_seg_model(num_classes=4), tmp_path)
    assert manifest.labels == ["class0", "class1", "class2", "class3"]


def test_label_count_must_match_the_outputs(tmp_path) -> None:
    with pytest.raises(ValueError, match="3 names but the model has 4 output classes"):
        export(_seg_model(num_classes=4), tmp_path, ExportOptions(labels=SHAPES_DET))


def test_segmentation_scale_can_be_overridden(tmp_path) -> None:
    manifest = export(_seg_model(), tmp_path, ExportOptions(scale=(512, 128)))
    assert manifest.preprocess.scale == (512, 128)


def test_fp16_segmentation_bundle_is_checked_and_listed(tmp_path) -> None:
    manifest = export(_seg_model(), tmp_path, ExportOptions(fp16=True))
    fp16 = manifest.engine_for("onnx", "fp16")
    assert fp16.file == "model.fp16.onnx" and "model.fp16.onnx" in manifest.files
    record = next(p for p in manifest.parity if p.engine == "model.fp16.onnx")
    assert record.passed and record.pixel_agreement > 0.99


def test_checkpoint_is_loaded_and_recorded(tmp_path) -> None:
    trained = _seg_model(num_classes=4)
    path = tmp_path / "tiny_seg.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    fresh = create_model("upernet_hornet_tiny_7x7", image_size=TILE, num_classes=4, **TINY_SEG)
    manifest = export(fresh, tmp_path / "bundle", ExportOptions(checkpoint=path))
    torch.testing.assert_close(fresh.state_dict(), trained.state_dict(), rtol=0, atol=0)
    assert not manifest.weights.random and manifest.weights.checkpoint == "tiny_seg.pth"


def test_unknown_gf_mode_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="gf_mode 'fft' is not supported"):
        export(_seg_model(), tmp_path, ExportOptions(gf_mode="fft"))


def test_dft_gf_mode_is_refused_for_detection(tmp_path) -> None:
    with pytest.raises(ValueError, match="gf_mode 'dft' is not supported for detection"):
        export(_det_model(), tmp_path, ExportOptions(gf_mode="dft"))


def test_fp16_detection_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="fp16 detection bundles are not supported"):
        export(_det_model(), tmp_path, ExportOptions(fp16=True))


def test_a_detector_is_refused_by_the_segmentation_exporter(tmp_path) -> None:
    with pytest.raises(ValueError, match="is a 'detect' model"):
        export_segmentation(_det_model(), tmp_path, ExportOptions())


def test_progress_messages_reach_the_callback(tmp_path) -> None:
    messages: list[str] = []
    export(_seg_model(), tmp_path, ExportOptions(progress=messages.append))
    assert any("exporting" in m for m in messages) and any("parity" in m for m in messages)


def test_export_extra_is_recorded_after_the_exporters_own_facts(tmp_path) -> None:
    options = ExportOptions(export_extra={"demo_training": {"steps": 3}})
    manifest = export(_seg_model(), tmp_path, options)
    assert list(manifest.export)[-1] == "demo_training"
    assert manifest.export["demo_training"] == {"steps": 3} and manifest.export["opset"]


def test_export_extra_may_not_replace_what_the_exporter_records(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"export_extra .* \['opset'\]"):
        export(_seg_model(), tmp_path, ExportOptions(export_extra={"opset": 1}))
