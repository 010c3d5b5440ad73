"""Exporting the mmdet-layout detectors (issue P10, items 3 and 5) at tiny widths.

The bundle's graph takes the image fitted on the host and answers 28x28 masks; the
reference for its outputs is our torch model run with mmdet's test pipeline on the host
(model_export.mmdet_pipeline: normalise and pad in numpy), itself cross-checked against
mmdet in tests/crosscheck. The host paste is compared with grid_sample as mmdet calls it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hornet_bundle import load_bundle
from hornet_bundle.preprocess import fit_image
from model_export.export import ExportOptions, export
from model_export.export.detect import match_detections
from model_export.export.onnx_graph import onnx_op_types
from model_export.export.options import ParityImages
from model_export.export.precision import photographs
from model_export.export.session import ort_session
from model_export.labels import coco_classes
from model_export.mmdet_pipeline import paste_masks, prepare
from service.imaging import paste_mask_window
from tests.helpers.dense_tiny import tiny_mmdet_detector

GF = "cascade_mask_rcnn_hornet_tiny_gf"


@pytest.fixture(scope="module")
def gf_bundle(tmp_path_factory: pytest.TempPathFactory):
    """Checked on the photographs fitted to (400, 240) instead of the bundle's (1333,
    800) to keep this quick; the cross-check exports with the default photographs."""
    model = tiny_mmdet_detector(GF)
    out = tmp_path_factory.mktemp("mmdet_gf")
    small = [fit_image(Image.fromarray(photo), (400, 240), "opencv") for photo in photographs()]
    export(model, out, ExportOptions(parity_images=_images(small, "small photographs")))
    return model, out


def test_bundle_states_the_host_pipeline_and_roi_masks(gf_bundle) -> None:
    _, out = gf_bundle
    manifest = load_bundle(out).manifest
    assert manifest.task == "detect" and manifest.labels == list(coco_classes())
    pre = manifest.preprocess
    assert (pre.resize_mode, pre.scale, pre.resize_backend) == ("fit", (1333, 800), "opencv")
    assert pre.mean == (123.675, 116.28, 103.53) and pre.pixel_range == 255
    assert [o.name for o in manifest.outputs] == ["boxes", "labels", "scores", "masks"]
    assert manifest.outputs[3].shape == [-1, 28, 28]
    assert manifest.export["mask_output"] == "roi" and manifest.export["gf_mode"] == "matmul"
    (record,) = manifest.parity
    assert record.passed and record.detections_paired
    assert "small photographs 240x240, 240x360, 240x361" in record.inputs
    ops = onnx_op_types(out / "model.onnx")
    assert {"RoiAlign", "NonMaxSuppression", "TopK"} <= ops and "DFT" not in ops


@pytest.mark.parametrize("size", [(37, 61), (200, 333), (96, 128)])
def test_graph_equals_the_torch_model_with_mmdets_pipeline_at_any_size(gf_bundle, size) -> None:
    """Sizes that are and are not multiples of 32 (the graph pads itself); GF filters
    resized to each map inside the graph."""
    model, out = gf_bundle
    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    prepared = prepare(image, model.pretrained_cfg.mean, model.pretrained_cfg.std, scale=size[::-1])
    assert prepared.image_shape == size  # already at the scale: nothing resized
    with torch.no_grad():
        (ref,) = model(prepared.image, [prepared.image_shape])
    ref = [ref[k].numpy() for k in ("boxes", "labels", "scores", "masks")]
    got = ort_session(out / "model.onnx").run(None, {"image": image})
    assert len(ref[0]) > 10 and got[0].shape == ref[0].shape
    order = match_detections(ref, got)
    assert order is not None
    assert np.abs(got[0][order] - ref[0]).max() < 1e-3 * max(size)
    assert np.abs(got[2][order] - ref[2]).max() < 1e-4
    assert np.abs(got[3][order] - ref[3]).max() < 1e-3


def test_a_graph_without_detections_answers_empty_arrays(tmp_path) -> None:
    model = tiny_mmdet_detector(background_bias=100.0)
    image = np.random.default_rng(0).integers(0, 256, (160, 224, 3), dtype=np.uint8)
    options = ExportOptions(parity_images=_images([np.full((64, 64, 3), 128, np.uint8)]))
    with pytest.raises(Exception, match="no detections"):
        export(model, tmp_path, options)  # parity needs detections to compare
    boxes, labels, scores, masks = ort_session(tmp_path / "model.onnx").run(None, {"image": image})
    assert boxes.shape == (0, 4) and labels.shape == scores.shape == (0,)
    assert masks.shape == (0, 28, 28)


def test_fp16_detection_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="fp16"):
        export(tiny_mmdet_detector(), tmp_path, ExportOptions(fp16=True))


def _images(arrays, description: str = "test images") -> ParityImages:
    return ParityImages([torch.from_numpy(a) for a in arrays], description)


def test_host_paste_equals_grid_sample_as_mmdet_pastes() -> None:
    """service.imaging.paste_mask_window (numpy, the box's window only) against mmdet's
    _do_paste_mask as written with F.grid_sample (model_export.mmdet_pipeline), on
    random maps and boxes: inside, across and outside the image, and thin boxes."""
    rng = np.random.default_rng(0)
    worst = 1.0
    for trial in range(200):
        height, width = (int(v) for v in rng.integers(5, 300, 2))
        mask = rng.random((28, 28)).astype(np.float32)
        x0, x1 = np.sort(rng.uniform(-20, width + 20, 2))
        y0, y1 = np.sort(rng.uniform(-20, height + 20, 2))
        if trial % 5 == 0:
            x1 = x0 + rng.uniform(0.1, 1.5)
        box = np.array([x0, y0, x1, y1], np.float32)
        ref = paste_masks(torch.from_numpy(mask)[None], torch.from_numpy(box)[None], height, width)
        ref = (ref[0] >= 0.5).numpy()
        window, (top, bottom), (left, right) = paste_mask_window(mask, box, (height, width))
        ours = np.zeros((height, width), bool)
        ours[top:bottom, left:right] = window.astype(bool)
        worst = min(worst, float((ours == ref).mean()))
    assert worst > 0.9999  # float32 ties at exactly 0.5 may fall either way
