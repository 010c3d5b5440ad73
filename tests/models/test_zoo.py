"""The ten classifier variants against the spec's table, key layout and the public API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model_export import create_model, get_variant, list_variants

# HORNET_SPEC.md, "Network": params (M) and GMACs (FFT not counted) at the native size.
SPEC = {
    "hornet_tiny_7x7": (22.41, 3.97, 224, 1000),
    "hornet_tiny_gf": (22.99, 3.89, 224, 1000),
    "hornet_small_7x7": (49.53, 8.81, 224, 1000),
    "hornet_small_gf": (50.40, 8.69, 224, 1000),
    "hornet_base_7x7": (87.26, 15.57, 224, 1000),
    "hornet_base_gf": (88.42, 15.41, 224, 1000),
    "hornet_base_gf_img384": (92.10, 45.28, 384, 1000),
    "hornet_large_7x7": (209.08, 34.81, 224, 10459),
    "hornet_large_gf": (210.83, 34.57, 224, 10459),
    "hornet_large_gf_img384": (216.35, 101.57, 384, 10459),
}
ALIASES = {
    "hornet_t_7x7": "hornet_tiny_7x7",
    "hornet_t_gf": "hornet_tiny_gf",
    "hornet_s_7x7": "hornet_small_7x7",
    "hornet_s_gf": "hornet_small_gf",
    "hornet_b_7x7": "hornet_base_7x7",
    "hornet_b_gf": "hornet_base_gf",
    "hornet_b_gf_384": "hornet_base_gf_img384",
    "hornet_l_7x7": "hornet_large_7x7",
    "hornet_l_gf": "hornet_large_gf",
    "hornet_l_gf_384": "hornet_large_gf_img384",
}
KEYS_FILE = Path(__file__).parents[1] / "data" / "hornet_tiny_gf.keys.txt"


def test_the_ten_classifiers_and_their_aliases_are_registered():
    assert set(list_variants("classify")) == set(SPEC)
    for alias, name in ALIASES.items():
        assert get_variant(alias).name == name
    assert set(ALIASES) <= set(list_variants("classify", aliases=True))


@pytest.mark.parametrize("name", sorted(SPEC))
def test_parameters_and_macs_equal_the_spec(name):
    params_m, gmacs, size, classes = SPEC[name]
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.005)
    assert model.pretrained_cfg.input_size == (3, size, size)
    assert model.pretrained_cfg.num_classes == classes
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = model(torch.empty(1, 3, size, size, device="meta"))
    assert tuple(out.shape) == (1, classes)
    assert counter.get_total_flops() / 2e9 == pytest.approx(gmacs, abs=0.005)


def _expected_keys() -> dict[str, tuple[int, ...]]:
    depths = (2, 3, 18, 2)
    keys = {}
    for line in KEYS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split(None, 1)
        dims = tuple(int(v) for v in re.findall(r"\d+", shape))
        if "{j}" in name:
            stage = int(re.match(r"stages\.(\d)\.", name).group(1))
            for j in range(depths[stage]):
                keys[name.replace("{j}", str(j))] = dims
        else:
            keys[name] = dims
    return keys


def test_state_dict_layout_equals_the_official_release():
    expected = _expected_keys()
    assert len(expected) == 640
    with torch.device("meta"):
        model = create_model("hornet_tiny_gf")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_create_model_gives_an_eval_module_returning_logits():
    model = create_model("hornet_t_gf", base_dim=32, depths=(1, 1, 2, 1), num_classes=7)
    assert not model.training
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7) and logits.dtype == torch.float32


def test_unknown_variant_lists_the_valid_names():
    with pytest.raises(KeyError) as err:
        create_model("hornet_huge")
    message = str(err.value)
    assert "hornet_huge" in message and "hornet_tiny_gf" in message and "hornet_l_gf_384" in message


def test_pretrained_cfgs_carry_the_official_transforms():
    tiny = get_variant("hornet_tiny_7x7").cfg
    assert (tiny.crop_pct, tiny.interpolation) == (0.875, "bicubic")
    assert tiny.mean == pytest.approx((0.485, 0.456, 0.406)) and tiny.std == pytest.approx(
        (0.229, 0.224, 0.225)
    )
    big = get_variant("hornet_large_gf_img384").cfg
    assert big.crop_pct == 1.0 and big.label_set == "hornet-22k"
    assert big.preprocess()["resize_mode"] == "direct"
    assert tiny.preprocess()["resize_mode"] == "shorter_side_center_crop"
