"""The multi-scale HorNet backbone and the dense variant table."""

from __future__ import annotations

import pytest
import torch

from model_export import create_model, list_variants
from model_export.hornet import HorNetFeatures
from model_export.registry import get_variant
from tests.helpers.dense_tiny import TINY

SIZES = ("tiny", "small", "base", "large")
MIXERS = ("7x7", "gf")


def test_feature_maps_have_strides_4_to_32_and_stage_widths() -> None:
    backbone = HorNetFeatures(gf=True, image_size=128, **TINY).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 128, 192))
    assert [tuple(f.shape) for f in features] == [
        (2, 16, 32, 48),
        (2, 32, 16, 24),
        (2, 64, 8, 12),
        (2, 128, 4, 6),
    ]


def test_feature_maps_are_layer_normed_per_stage() -> None:
    backbone = HorNetFeatures(**TINY).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    for f in features:
        torch.testing.assert_close(f.mean(1), torch.zeros_like(f.mean(1)), atol=1e-5, rtol=0)


def test_backbone_keys_are_the_official_names() -> None:
    keys = create_model("upernet_hornet_tiny_7x7", **TINY).state_dict()
    for i in range(4):
        assert f"backbone.norm{i}.weight" in keys
        assert f"backbone.downsample_layers.{i}.0.weight" in keys
        assert f"backbone.stages.{i}.0.gnconv.proj_in.weight" in keys


@pytest.mark.parametrize(
    ("name", "stage3", "stage4"),
    [
        ("upernet_hornet_tiny_gf", (32, 17), (16, 9)),
        ("upernet_hornet_large_gf", (40, 21), (20, 11)),
    ],
)
def test_seg_gf_filters_fit_the_served_tile(name, stage3, stage4) -> None:
    model = create_model(name, depths=(1, 1, 1, 1), channels=32)
    filters = [model.backbone.stages[i][0].gnconv.dwconv.complex_weight for i in (2, 3)]
    assert tuple(filters[0].shape[1:3]) == stage3
    assert tuple(filters[1].shape[1:3]) == stage4


def test_every_official_segmentation_variant_is_registered() -> None:
    expected = {f"upernet_hornet_{s}_{m}" for s in SIZES for m in MIXERS}
    expected |= {f"horfpn_{m}_upernet_hornet_small_7x7" for m in MIXERS}
    assert set(list_variants("segment")) == expected


def test_every_official_detection_variant_is_registered() -> None:
    # This project's torchvision layout (model_export.dense): `tv_` + the config names.
    expected = {f"tv_mask_rcnn_hornet_{s}_{m}" for s in SIZES for m in MIXERS}
    expected |= {
        f"tv_horfpn_{f}_mask_rcnn_hornet_{s}_{m}" for f in MIXERS for s in SIZES for m in MIXERS
    }
    # mmdet's layout (model_export.mmdet_detectors), under the official config names: the
    # released cascades and the HorFPN study's Mask R-CNNs.
    expected |= {f"cascade_mask_rcnn_hornet_{s}_{m}" for s in SIZES for m in MIXERS}
    official = {f"{n}_mask_rcnn_hornet_small_7x7" for n in ("horfpn_7x7", "horfpn_gf")}
    official |= {"mask_rcnn_hornet_small_7x7"}
    assert set(list_variants("detect")) == expected | official
    assert all(get_variant(name).name == name for name in official)
    # the torchvision-layout family's former names, where not official, are aliases
    assert get_variant("horfpn_7x7_mask_rcnn_hornet_tiny_7x7").name == (
        "tv_horfpn_7x7_mask_rcnn_hornet_tiny_7x7"
    )


@pytest.mark.parametrize(
    ("name", "tile", "stride", "scale"),
    [
        ("upernet_hornet_base_gf", 512, 341, (2048, 512)),
        ("upernet_hornet_large_7x7", 640, 426, (2560, 640)),
    ],
)
def test_seg_config_holds_the_mmseg_test_pipeline(name, tile, stride, scale) -> None:
    model = create_model(name, depths=(1, 1, 1, 1), channels=32)
    pre = model.pretrained_cfg.preprocess()
    assert pre["resize_mode"] == "fit" and pre["scale"] == scale
    assert pre["sliding_window"] == {"crop": (tile, tile), "stride": (stride, stride)}
    assert pre["mean"] == (123.675, 116.28, 103.53) and pre["pixel_range"] == 255
    assert pre["resize_backend"] == "opencv" and pre["interpolation"] == "bilinear"
    assert model.pretrained_cfg.num_classes == 150 and model.pretrained_cfg.label_set == "ade20k"


def test_backbone_width_overrides_reach_the_network() -> None:
    model = create_model("mask_rcnn_hornet_large_7x7", base_dim=16, depths=(1, 1, 1, 1))
    assert model.backbone.backbone.out_channels == [16, 32, 64, 128]
