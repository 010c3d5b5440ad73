"""Segmentation and detection bundles: ONNX Runtime reproduces the torch model and the
manifest records what the service needs."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hornet_bundle import Manifest
from model_export import create_model
from model_export.export import ExportOptions, ParityError, export, segment
from model_export.export.segment import SegmentationTileGraph
from tests.helpers.dense_tiny import TINY_DET, TINY_SEG, randomize_

TILE = 128


def _seg_model(name: str):
    return randomize_(create_model(name, image_size=TILE, **TINY_SEG), seed=2)


@pytest.mark.parametrize(
    ("name", "gf_mode", "engine_gf_mode"),
    [
        ("upernet_hornet_tiny_7x7", "auto", "none"),
        ("upernet_hornet_tiny_gf", "auto", "matmul"),
        ("horfpn_gf_upernet_hornet_small_7x7", "matmul", "matmul"),
        ("horfpn_gf_upernet_hornet_small_7x7", "circular_conv", "circular_conv"),
        ("upernet_hornet_tiny_gf", "dense_dft", "matmul"),
        ("upernet_hornet_tiny_gf", "dft", "dft"),
    ],
)
def test_segmentation_bundle_matches_torch(tmp_path, name, gf_mode, engine_gf_mode) -> None:
    manifest = export(_seg_model(name), tmp_path, ExportOptions(gf_mode=gf_mode))
    parity = manifest.parity[0]
    assert parity.passed and parity.max_relative_error < 1e-5 and parity.pixel_agreement > 0.999
    assert manifest.inputs[0].shape == [-1, TILE, TILE, 3] and manifest.inputs[0].dtype == "uint8"
    assert manifest.outputs[0].shape == [-1, 150, TILE, TILE]
    assert manifest.engines[0].gf_mode == engine_gf_mode
    assert Manifest.model_validate(json.loads((tmp_path / "manifest.json").read_text())) == manifest


def test_auto_gf_mode_without_the_rewrite_uses_separable_dft(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(segment, "_gf_rewrite", lambda: None)
    manifest = export(_seg_model("upernet_hornet_tiny_gf"), tmp_path)
    assert manifest.engines[0].gf_mode == "matmul" and manifest.export["gf_graph"] == "separable"
    assert manifest.parity[0].passed


def test_segmentation_graph_normalises_uint8_tiles_inside(tmp_path) -> None:
    model = _seg_model("upernet_hornet_tiny_7x7")
    manifest = export(model, tmp_path)
    tiles = np.random.default_rng(5).integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": tiles})[0]
    mean = torch.tensor(manifest.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(manifest.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((torch.from_numpy(tiles).permute(0, 3, 1, 2).float() - mean) / std)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_segmentation_manifest_records_the_sliding_window(tmp_path) -> None:
    manifest = export(_seg_model("upernet_hornet_tiny_7x7"), tmp_path)
    pre = manifest.preprocess
    assert pre.resize_mode == "fit" and pre.scale == (2048, 512) and pre.pixel_range == 255
    assert pre.sliding_window.crop == (TILE, TILE)
    assert pre.sliding_window.stride == (int(341 * TILE / 512),) * 2
    assert manifest.labels[0] == "wall" and len(manifest.labels) == 150
    assert manifest.weights.random


def test_segmentation_parity_failure_is_raised_and_recorded(tmp_path) -> None:
    with pytest.raises(ParityError, match="relative error"):
        export(_seg_model("upernet_hornet_tiny_7x7"), tmp_path, ExportOptions(tolerance=0.0))
    record = json.loads((tmp_path / "manifest.json").read_text())["parity"][0]
    assert record["passed"] is False


def test_tile_graph_is_the_normalised_model() -> None:
    model = _seg_model("upernet_hornet_tiny_7x7")
    graph = SegmentationTileGraph(model, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0))
    tiles = torch.randint(0, 256, (1, TILE, TILE, 3), dtype=torch.uint8)
    mean = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)
    std = torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    x = (tiles.permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(graph(tiles), model(x))


def test_detection_bundle_matches_torch(tmp_path) -> None:
    model = create_model("horfpn_7x7_mask_rcnn_hornet_tiny_7x7", box_score_thresh=0.0, **TINY_DET)
    randomize_(model, seed=3, gamma=0.1)
    manifest = export(model, tmp_path, ExportOptions(image_sizes=((120, 160), (100, 90))))
    parity = manifest.parity[0]
    assert parity.passed and parity.box_score_error < 1e-4 and parity.detections_paired == 1.0
    assert [o.name for o in manifest.outputs] == ["boxes", "labels", "scores", "masks"]
    assert len(manifest.labels) == 80 and manifest.labels[0] == "person"
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    boxes, labels, scores, masks = session.run(None, {"image": image})
    assert len(boxes) > 0 and labels.min() >= 0 and labels.max() <= 79
    assert masks.shape == (len(boxes), 1, 90, 130)
    assert (boxes[:, 2] <= 130).all() and (boxes[:, 3] <= 90).all()


def test_a_detector_that_finds_nothing_fails_parity_with_a_clear_error(tmp_path) -> None:
    model = create_model("horfpn_7x7_mask_rcnn_hornet_tiny_7x7", box_score_thresh=1.01, **TINY_DET)
    randomize_(model, seed=3, gamma=0.1)
    with pytest.raises(ParityError, match="no detections on 120x160"):
        export(model, tmp_path, ExportOptions(image_sizes=((120, 160),)))
