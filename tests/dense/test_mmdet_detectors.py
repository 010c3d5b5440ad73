"""The mmdet-layout HorNet detectors (issue P10, items 1-3, torch side): variants named
after the official configs with their architecture, strict mmdet checkpoint loading,
label sources, and the mmdet test-time components against their definitions. Whole
detections against mmdet itself: tests/crosscheck/test_mmdet_crosscheck.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align

from model_export import create_model
from model_export.checkpoint import CheckpointError
from model_export.labels import coco_classes
from model_export.mmdet_heads import (
    AnchorGenerator,
    RoIExtractor,
    decode_boxes,
    encode_boxes,
    roi_levels,
)
from model_export.mmdet_pipeline import paste_masks, prepare, rescale_size
from model_export.registry import list_variants
from tests.helpers.dense_tiny import randomize_

Shapes = dict[str, tuple[int, ...]]

SIZES = ("tiny", "small", "base", "large")
CASCADES = [f"cascade_mask_rcnn_hornet_{s}_{m}" for s in SIZES for m in ("7x7", "gf")]
MASK_RCNNS = [
    "mask_rcnn_hornet_small_7x7",
    "horfpn_7x7_mask_rcnn_hornet_small_7x7",
    "horfpn_gf_mask_rcnn_hornet_small_7x7",
]
TINY = dict(base_dim=16, depths=(1, 1, 1, 1), fpn_channels=32, fc_channels=64)
# object_detection/README.md of the official repository: #params of the released cascades.
RELEASED_PARAMS_M = dict(zip(CASCADES, (80, 80, 107, 108, 144, 146, 251, 259), strict=True))
CLASSES = 80


# The official module structure, written from mmdet 2.28's classes and the configs.
def conv_module(prefix: str, cin: int, cout: int, kernel: int, norm: bool) -> Shapes:
    """mmcv's ConvModule: conv (bias only without a norm), then `bn` when normed."""
    shapes = {f"{prefix}.conv.weight": (cout, cin, kernel, kernel)}
    if not norm:
        return shapes | {f"{prefix}.conv.bias": (cout,)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.bn.{name}"] = (cout,)
    return shapes | {f"{prefix}.bn.num_batches_tracked": ()}


def layer(prefix: str, weight: tuple[int, ...]) -> Shapes:
    return {f"{prefix}.weight": weight, f"{prefix}.bias": (weight[0],)}


def rpn_head(channels: int = 256, anchors: int = 3) -> Shapes:
    return (
        layer("rpn_head.rpn_conv", (channels, channels, 3, 3))
        | layer("rpn_head.rpn_cls", (anchors, channels, 1, 1))
        | layer("rpn_head.rpn_reg", (anchors * 4, channels, 1, 1))
    )


def convfc_bbox_head(prefix: str, convs: int, fcs: int, norm: bool) -> Shapes:
    """ConvFCBBoxHead(num_shared_convs, num_shared_fcs), class-specific regression."""
    shapes: Shapes = {}
    for i in range(convs):
        shapes |= conv_module(f"{prefix}.shared_convs.{i}", 256, 256, 3, norm)
    width = 256 * 7 * 7
    for i in range(fcs):
        shapes |= layer(f"{prefix}.shared_fcs.{i}", (1024, width if i == 0 else 1024))
    shapes |= layer(f"{prefix}.fc_cls", (CLASSES + 1, 1024))
    return shapes | layer(f"{prefix}.fc_reg", (4 * CLASSES, 1024))


def fcn_mask_head(prefix: str) -> Shapes:
    shapes: Shapes = {}
    for i in range(4):
        shapes |= conv_module(f"{prefix}.convs.{i}", 256, 256, 3, False)
    shapes |= {f"{prefix}.upsample.weight": (256, 256, 2, 2), f"{prefix}.upsample.bias": (256,)}
    return shapes | layer(f"{prefix}.conv_logits", (CLASSES, 256, 1, 1))


def fpn(in_channels: list[int]) -> Shapes:
    shapes: Shapes = {}
    for i, cin in enumerate(in_channels):
        shapes |= conv_module(f"neck.lateral_convs.{i}", cin, 256, 1, False)
        shapes |= conv_module(f"neck.fpn_convs.{i}", 256, 256, 3, False)
    return shapes


def heads(cascade: bool) -> Shapes:
    shapes = rpn_head()
    if not cascade:
        shapes |= convfc_bbox_head("roi_head.bbox_head", 0, 2, False)
        return shapes | fcn_mask_head("roi_head.mask_head")
    for stage in range(3):
        shapes |= convfc_bbox_head(f"roi_head.bbox_head.{stage}", 4, 1, True)
        shapes |= fcn_mask_head(f"roi_head.mask_head.{stage}")
    return shapes


def _shapes(model: torch.nn.Module, prefix: str = "") -> Shapes:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_every_official_detector_is_a_variant() -> None:
    assert set(CASCADES + MASK_RCNNS) <= set(list_variants("detect"))


@pytest.mark.parametrize("name", CASCADES + MASK_RCNNS)
def test_heads_and_neck_have_the_official_keys(name) -> None:
    """Backbone keys are HorNet's (checked against the release elsewhere); the rest is
    the official structure, for the FPN configs the neck too (HorFPN's GNFPN keys:
    tests/dense/test_horfpn_official_keys.py)."""
    model = create_model(name, depths=(1, 1, 1, 1))
    widths = model.backbone.out_channels
    expected = heads(name.startswith("cascade"))
    got = {k: v for k, v in _shapes(model).items() if not k.startswith(("backbone.", "neck."))}
    assert got == expected
    if "horfpn" not in name:
        assert _shapes(model, "neck.") == fpn(widths)


@pytest.mark.parametrize("name", CASCADES)
def test_cascade_has_the_released_parameter_count(name) -> None:
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(count) == RELEASED_PARAMS_M[name]


def test_hornet_large_gf_detector_has_the_384_px_filters() -> None:
    """configs/hornet/cascade_mask_rcnn_hornet_large_gf: h=24, w=13 and h=12, w=7."""
    shapes = _shapes(create_model(CASCADES[7], depths=(1, 1, 1, 1)))
    assert shapes["backbone.stages.2.0.gnconv.dwconv.complex_weight"][1:3] == (24, 13)
    assert shapes["backbone.stages.3.0.gnconv.dwconv.complex_weight"][1:3] == (12, 7)


def _mmdet_file(tmp_path, model, meta: dict | None = None, edit=None):
    state = dict(model.state_dict())
    if edit:
        edit(state)
    path = tmp_path / "det.pth"
    torch.save({"meta": meta or {}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def tiny_cascade():
    return randomize_(create_model(CASCADES[1], **TINY), seed=3)


def test_mmdet_checkpoint_loads_every_key(tmp_path, tiny_cascade) -> None:
    path = _mmdet_file(tmp_path, tiny_cascade)
    loaded = create_model(CASCADES[1], checkpoint=path, **TINY)
    for key, value in tiny_cascade.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop("roi_head.bbox_head.2.fc_reg.bias"), "missing keys: roi_head.bbox_head.2"),
        (lambda s: s.update({"roi_head.extra.weight": torch.zeros(1)}), "unexpected keys: roi_h"),
        (
            lambda s: s.update({"rpn_head.rpn_cls.bias": torch.zeros(9)}),
            "rpn_head.rpn_cls.bias: checkpoint (9,) vs model (3,)",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_strict_load_names_the_offending_key(tmp_path, tiny_cascade, edit, named) -> None:
    path = _mmdet_file(tmp_path, tiny_cascade, edit=edit)
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(")", r"\)")):
        create_model(CASCADES[1], checkpoint=path, **TINY)


def test_torchvision_layout_file_is_refused_with_the_reason(tmp_path, tiny_cascade) -> None:
    path = _mmdet_file(
        tmp_path,
        tiny_cascade,
        edit=lambda s: s.update({"roi_heads.box_predictor.w": s["rpn_head.rpn_cls.bias"]}),
    )
    with pytest.raises(CheckpointError, match="torchvision-layout"):
        create_model(CASCADES[1], checkpoint=path, **TINY)


def test_meta_classes_become_the_labels(tmp_path, tiny_cascade) -> None:
    classes = tuple(f"thing {i}" for i in range(CLASSES))
    path = _mmdet_file(tmp_path, tiny_cascade, meta={"CLASSES": classes})
    model = create_model(CASCADES[1], checkpoint=path, **TINY)
    assert model.pretrained_cfg.extra["labels"] == list(classes)


def test_without_meta_classes_the_labels_are_cocos_from_torchvision(tmp_path, tiny_cascade):
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    model = create_model(CASCADES[1], checkpoint=_mmdet_file(tmp_path, tiny_cascade), **TINY)
    assert "labels" not in model.pretrained_cfg.extra and model.pretrained_cfg.label_set == "coco"
    categories = MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    assert list(coco_classes()) == [c for c in categories if c not in ("N/A", "__background__")]
    assert len(coco_classes()) == CLASSES


def test_meta_classes_of_another_count_are_refused(tmp_path, tiny_cascade) -> None:
    path = _mmdet_file(tmp_path, tiny_cascade, meta={"CLASSES": ("a", "b")})
    with pytest.raises(CheckpointError, match="names 2 classes but the model predicts 80"):
        create_model(CASCADES[1], checkpoint=path, **TINY)


def test_variants_carry_mmdets_test_pipeline() -> None:
    cfg = create_model(CASCADES[0], **TINY).pretrained_cfg
    assert cfg.extra["preprocess"]["scale"] == (1333, 800)
    assert cfg.extra["preprocess"]["resize_backend"] == "opencv"
    assert cfg.extra["pad_size_divisor"] == 32
    assert cfg.mean == (123.675, 116.28, 103.53) and cfg.std == (58.395, 57.12, 57.375)


# Components against their definitions.
def test_anchors_follow_mmdets_formula() -> None:
    """Centre (x * s, y * s), w = s * 8 / sqrt(r), h = s * 8 * sqrt(r), ratios 0.5, 1, 2,
    ordered (row, column, ratio)."""
    anchors = AnchorGenerator().grid_anchors(2, 2, 3).reshape(2, 3, 3, 4)
    for y in range(2):
        for x in range(3):
            for a, ratio in enumerate((0.5, 1.0, 2.0)):
                w, h = 16 * 8 / math.sqrt(ratio), 16 * 8 * math.sqrt(ratio)
                cx, cy = 16 * x, 16 * y
                expected = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
                torch.testing.assert_close(anchors[y, x, a], expected)


def test_delta_coder_round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    boxes = torch.rand(50, 2, generator=gen) * 300
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(50, 2, generator=gen) * 200], 1)
    targets = boxes + torch.randn(50, 4, generator=gen) * 4
    stds = (0.1, 0.1, 0.2, 0.2)
    torch.testing.assert_close(
        decode_boxes(boxes, encode_boxes(boxes, targets, stds), stds), targets
    )


def test_decoded_boxes_are_clipped_and_size_changes_bounded() -> None:
    box = torch.tensor([[10.0, 10.0, 20.0, 30.0]])
    grown = decode_boxes(box, torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert grown[0, 2] - grown[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-5)
    clipped = decode_boxes(box, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), image_shape=(50, 40))
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 50.0]]


def test_roi_levels_follow_finest_scale_56() -> None:
    """floor(log2(sqrt(w h) / 56 + 1e-6)) clamped to 0..3: edges at 112, 224, 448."""
    sides = torch.tensor([10.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], 1)
    assert roi_levels(boxes, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_roi_extractor_is_aligned_roi_align_on_the_assigned_level() -> None:
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(1, 4, 64 // 2**i, 96 // 2**i, generator=gen) for i in range(4)]
    boxes = torch.tensor([[3.5, 4.0, 50.0, 60.0], [0.0, 0.0, 250.0, 200.0]])
    pooled = RoIExtractor(7)(features, boxes)
    for k, level in enumerate(roi_levels(boxes, 4).tolist()):
        rois = torch.cat([torch.zeros(1, 1), boxes[k : k + 1]], 1)
        expected = roi_align(features[level], rois, 7, 1 / 4 / 2**level, 0, aligned=True)
        torch.testing.assert_close(pooled[k : k + 1], expected)


def test_pipeline_fits_the_scale_as_mmcv_rescales() -> None:
    """Factor min(1333 / long, 800 / short), each side int(side * factor + 0.5)."""
    assert rescale_size(400, 600) == (800, 1200)
    assert rescale_size(300, 451) == (800, 1203)
    assert rescale_size(1000, 200) == (1333, 267)
    prepared = prepare(torch.zeros(300, 451, 3, dtype=torch.uint8).numpy(), (0, 0, 0), (1, 1, 1))
    assert prepared.image.shape[-2] % 32 == 0 and prepared.image.shape[-1] % 32 == 0


def test_pasted_mask_fills_its_box() -> None:
    pasted = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 30.0, 50.0]]), 64, 64)
    inside = pasted[0] >= 0.5
    assert inside[20:50, 10:30].all() and inside.sum() == 20 * 30


def test_tiny_cascade_returns_detections_within_the_image(tiny_cascade) -> None:
    with torch.no_grad():
        (out,) = tiny_cascade(torch.randn(1, 3, 256, 320), [(250, 300)])
    assert out["masks"].shape[1:] == (28, 28) and len(out["boxes"]) <= 100
    assert (out["boxes"][:, 2] <= 300).all() and (out["boxes"][:, 3] <= 250).all()
    assert ((out["masks"] >= 0) & (out["masks"] <= 1)).all()
    assert (out["scores"] > 0.05).all() and (out["labels"] < CLASSES).all()
