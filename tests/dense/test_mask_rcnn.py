"""Mask R-CNN over HorNet + (Hor)FPN, assembled from torchvision's parts."""

from __future__ import annotations

import pytest
import torch

from model_export import create_model
from model_export.checkpoint import CheckpointError
from model_export.mask_rcnn import load_backbone_and_neck
from tests.helpers.dense_tiny import TINY_DET, randomize_


@pytest.fixture(scope="module")
def detector():
    model = create_model("horfpn_7x7_mask_rcnn_hornet_tiny_gf", box_score_thresh=0.0, **TINY_DET)
    return randomize_(model, seed=1).eval()


def test_backbone_is_a_torchvision_backbone_with_fpn(detector) -> None:
    with torch.no_grad():
        maps = detector.backbone(torch.randn(1, 3, 128, 160))
    assert detector.backbone.out_channels == 32
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [m.shape[-1] for m in maps.values()] == [40, 20, 10, 5, 3]


def test_eval_forward_returns_well_formed_detections_inside_the_image(detector) -> None:
    image = torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = detector([image])[0]
    boxes, labels, scores, masks = out["boxes"], out["labels"], out["scores"], out["masks"]
    assert 0 < len(boxes) <= 100
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 150).all() and (boxes[:, 3] <= 120).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert ((labels >= 1) & (labels <= 80)).all()
    assert (scores[:-1] >= scores[1:]).all() and scores.min() >= 0 and scores.max() <= 1
    assert masks.shape == (len(boxes), 1, 120, 150)
    assert masks.min() >= 0 and masks.max() <= 1


def test_detector_uses_mmdet_normalisation_and_coco_classes() -> None:
    model = create_model("tv_mask_rcnn_hornet_small_7x7", **TINY_DET)
    torch.testing.assert_close(
        torch.tensor(model.transform.image_mean) * 255, torch.tensor([123.675, 116.28, 103.53])
    )
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
    assert model.pretrained_cfg.label_set == "coco" and model.pretrained_cfg.num_classes == 80


def _mmdet_file(tmp_path, model, drop: str | None = None):
    """An mmdet-layout file: backbone/neck under their mmdet names, heads in mmdet's own
    layout (which torchvision's heads do not share)."""
    state = {}
    for key, value in model.backbone.state_dict().items():
        state[key] = torch.randn_like(value.float()).to(value.dtype) if value.dim() else value
    state = {k: v for k, v in state.items() if k != drop}
    state["rpn_head.rpn_conv.weight"] = torch.zeros(32, 32, 3, 3)
    state["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 1024)
    path = tmp_path / "mask_rcnn_mmdet.pth"
    torch.save({"state_dict": state}, path)
    return path, state


def test_mmdet_backbone_and_neck_load_with_heads_left_random(tmp_path) -> None:
    model = create_model("horfpn_gf_mask_rcnn_hornet_tiny_7x7", **TINY_DET)
    path, state = _mmdet_file(tmp_path, model)
    left = load_backbone_and_neck(model, path)
    key = "neck.fpn_convs.2.proj_in.weight"
    torch.testing.assert_close(model.backbone.neck.fpn_convs[2].proj_in.weight, state[key])
    assert "roi_heads.box_predictor.cls_score.weight" in left
    assert not any(k.startswith("backbone.") for k in left)


def test_mmdet_file_missing_a_neck_key_is_named(tmp_path) -> None:
    model = create_model("mask_rcnn_hornet_tiny_7x7", **TINY_DET)
    path, _ = _mmdet_file(tmp_path, model, drop="neck.lateral_convs.2.conv.bias")
    with pytest.raises(CheckpointError, match=r"missing keys: neck\.lateral_convs\.2\.conv\.bias"):
        load_backbone_and_neck(model, path)


def test_create_model_refuses_an_mmdet_file_and_says_how_to_load_it(tmp_path) -> None:
    model = create_model("mask_rcnn_hornet_tiny_7x7", **TINY_DET)
    path, _ = _mmdet_file(tmp_path, model)
    with pytest.raises(CheckpointError, match="load_backbone_and_neck"):
        create_model("mask_rcnn_hornet_tiny_7x7", checkpoint=path, **TINY_DET)


def test_torchvision_options_reach_the_rpn_and_the_roi_heads() -> None:
    model = create_model(
        "mask_rcnn_hornet_tiny_7x7",
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=500,
        box_batch_size_per_image=128,
        box_detections_per_img=50,
        **TINY_DET,
    ).train()
    assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (600, 500)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    assert model.roi_heads.detections_per_img == 50


def _greedy_nms(boxes: torch.Tensor, threshold: float) -> list[int]:
    """NMS by its definition, for boxes sorted by falling score: a box stays unless an
    earlier box that stayed overlaps it by IoU above `threshold`."""
    kept: list[int] = []
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        area = (x2 - x1) * (y2 - y1)
        for j in kept:
            a1, b1, a2, b2 = boxes[j].tolist()
            inter = max(0.0, min(x2, a2) - max(x1, a1)) * max(0.0, min(y2, b2) - max(y1, b1))
            if inter / (area + (a2 - a1) * (b2 - b1) - inter) > threshold:
                break
        else:
            kept.append(i)
    return kept


def test_class_agnostic_nms_keeps_one_detection_per_overlapping_group() -> None:
    model = create_model(
        "horfpn_7x7_mask_rcnn_hornet_tiny_gf",
        box_score_thresh=0.0,
        rpn_post_nms_top_n_test=5,
        **TINY_DET,
    )
    model = randomize_(model, seed=1).eval()
    # Five proposals and no box regression: every class proposes the same box for a
    # proposal, so per-class NMS keeps duplicates of a few boxes under many labels.
    with torch.no_grad():
        model.roi_heads.box_predictor.bbox_pred.weight.zero_()
        model.roi_heads.box_predictor.bbox_pred.bias.zero_()
    image = torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_class = model([image])[0]
        model.class_agnostic_nms = True
        agnostic = model([image])[0]
    kept = _greedy_nms(per_class["boxes"], model.roi_heads.nms_thresh)
    # The per-class output overlaps across labels (else the option would change nothing).
    assert 0 < len(kept) < len(per_class["boxes"])
    assert set(agnostic) == set(per_class)
    for key, value in agnostic.items():
        torch.testing.assert_close(value, per_class[key][kept], rtol=0, atol=0)
