"""mmseg-format UperNet checkpoints load strictly; labels come from maintained sources.

The synthetic checkpoint is written from the published key list (tests/data, the
hornet_tiny_gf classifier's keys) and the mmseg UPerHead layout in HORNET_SPEC.md, not
from the model's own state dict, so a wrong name or shape in the model fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from model_export import create_model
from model_export.checkpoint import CheckpointError
from model_export.gnconv import resize_complex_filter
from model_export.labels import labels_for

KEYS_FILE = Path(__file__).parents[1] / "data" / "hornet_tiny_gf.keys.txt"
DEPTHS = (2, 3, 18, 2)
WIDTHS = (64, 128, 256, 512)
CHANNELS = 512
CLASSES = 150


def _backbone_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split(maxsplit=1)
        if key.startswith(("norm.", "head.")):
            continue
        dims = tuple(int(d) for d in re.findall(r"\d+", shape))
        stage = re.match(r"stages\.(\d)\.", key)
        blocks = range(DEPTHS[int(stage.group(1))]) if stage else [None]
        for j in blocks:
            shapes["backbone." + key.replace("{j}", str(j))] = dims
    for i, width in enumerate(WIDTHS):
        shapes[f"backbone.norm{i}.weight"] = shapes[f"backbone.norm{i}.bias"] = (width,)
    return shapes


def _conv_module(prefix: str, cin: int, cout: int, k: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.conv.weight": (cout, cin, k, k)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.bn.{name}"] = (cout,)
    shapes[f"{prefix}.bn.num_batches_tracked"] = ()
    return shapes


def _uper_head_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(4):
        shapes |= _conv_module(f"decode_head.psp_modules.{i}.1", WIDTHS[3], CHANNELS, 1)
    shapes |= _conv_module("decode_head.bottleneck", WIDTHS[3] + 4 * CHANNELS, CHANNELS, 3)
    for i in range(3):
        shapes |= _conv_module(f"decode_head.lateral_convs.{i}", WIDTHS[i], CHANNELS, 1)
        shapes |= _conv_module(f"decode_head.fpn_convs.{i}", CHANNELS, CHANNELS, 3)
    shapes |= _conv_module("decode_head.fpn_bottleneck", 4 * CHANNELS, CHANNELS, 3)
    shapes["decode_head.conv_seg.weight"] = (CLASSES, CHANNELS, 1, 1)
    shapes["decode_head.conv_seg.bias"] = (CLASSES,)
    # The training-only FCN auxiliary head: present in released files, never served.
    shapes |= _conv_module("auxiliary_head.convs.0", WIDTHS[2], 256, 3)
    shapes["auxiliary_head.conv_seg.weight"] = (CLASSES, 256, 1, 1)
    shapes["auxiliary_head.conv_seg.bias"] = (CLASSES,)
    return shapes


def _mmseg_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in (_backbone_shapes() | _uper_head_shapes()).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1 + 0.01
    return state


@pytest.fixture(scope="module")
def mmseg_state() -> dict[str, torch.Tensor]:
    return _mmseg_state_dict()


def _save(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "upernet_hornet_tiny_gf_512_160k_ade20k.pth"
    torch.save({"meta": {"iter": 160000}, "state_dict": state}, path)
    return path


def test_synthetic_checkpoint_covers_the_released_layout(mmseg_state) -> None:
    assert sum(k.startswith("backbone.") for k in mmseg_state) == 640 - 4 + 8
    assert any(k.startswith("auxiliary_head.") for k in mmseg_state)


def test_mmseg_checkpoint_loads_strictly_with_gf_filters_resized_to_the_tile(
    tmp_path, mmseg_state
) -> None:
    model = create_model("upernet_hornet_tiny_gf", checkpoint=_save(tmp_path, mmseg_state))
    own = model.state_dict()
    key = "decode_head.fpn_bottleneck.conv.weight"
    torch.testing.assert_close(own[key], mmseg_state[key], rtol=0, atol=0)
    gf = "backbone.stages.2.5.gnconv.dwconv.complex_weight"
    assert own[gf].shape == (240, 32, 17, 2)
    torch.testing.assert_close(own[gf], resize_complex_filter(mmseg_state[gf], (32, 17)))
    assert not any(k.startswith("auxiliary_head") for k in own)


def test_missing_key_is_named(tmp_path, mmseg_state) -> None:
    state = dict(mmseg_state)
    del state["decode_head.lateral_convs.1.bn.running_var"]
    missing = r"missing keys: decode_head\.lateral_convs\.1\.bn\.running_var"
    with pytest.raises(CheckpointError, match=missing):
        create_model("upernet_hornet_tiny_gf", checkpoint=_save(tmp_path, state))


def test_shape_mismatch_is_named(tmp_path, mmseg_state) -> None:
    state = dict(mmseg_state)
    state["decode_head.conv_seg.weight"] = torch.zeros(19, CHANNELS, 1, 1)
    with pytest.raises(CheckpointError, match=r"decode_head\.conv_seg\.weight: checkpoint \(19,"):
        create_model("upernet_hornet_tiny_gf", checkpoint=_save(tmp_path, state))


def test_ade20k_labels_are_the_150_classes_without_other() -> None:
    names = labels_for("ade20k", 150)
    assert len(set(names)) == 150
    assert names[:3] == ["wall", "building", "sky"] and names[-1] == "flag"


def test_coco_labels_are_the_80_detection_classes() -> None:
    names = labels_for("coco", 80)
    assert len(set(names)) == 80 and "N/A" not in names
    assert names[0] == "person" and names[-1] == "toothbrush"


SMALL_WIDTHS = (96, 192, 384, 768)


def _small_widths(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A tiny-backbone head shape at HorNet-S widths (the stage widths are inputs)."""
    if key.startswith("decode_head.lateral_convs.") and key.endswith("conv.weight"):
        i = int(key.split(".")[2])
        return (shape[0], SMALL_WIDTHS[i], *shape[2:])
    if key.startswith("decode_head.psp_modules.") and key.endswith("conv.weight"):
        return (shape[0], SMALL_WIDTHS[3], *shape[2:])
    if key == "decode_head.bottleneck.conv.weight":
        return (shape[0], SMALL_WIDTHS[3] + 4 * CHANNELS, *shape[2:])
    return shape


def _horfpn_bottleneck_shapes(mixer: str) -> dict[str, tuple[int, ...]]:
    """HorFPN's fusion module in place of `fpn_bottleneck` (spec): order-2 gnConv of width
    512 fed 4 * 512 channels, proj_out (as both official configs set it), no 1/3 scale,
    then the ConvModule's BN."""
    prefix, width = "decode_head.fpn_bottleneck", CHANNELS
    mixed = width // 2 + width
    shapes = {
        f"{prefix}.proj_in.weight": (2 * width, 4 * CHANNELS, 1, 1),
        f"{prefix}.proj_in.bias": (2 * width,),
        f"{prefix}.pws.0.weight": (width, width // 2, 1, 1),
        f"{prefix}.pws.0.bias": (width,),
        f"{prefix}.proj_out.weight": (width, width, 1, 1),
        f"{prefix}.proj_out.bias": (width,),
    }
    if mixer == "7x7":
        shapes[f"{prefix}.dwconv.weight"] = (mixed, 1, 7, 7)
        shapes[f"{prefix}.dwconv.bias"] = (mixed,)
    else:
        shapes[f"{prefix}.dwconv.dw.weight"] = (mixed // 2, 1, 3, 3)
        shapes[f"{prefix}.dwconv.complex_weight"] = (mixed // 2, 32, 17, 2)
        for norm in ("pre_norm", "post_norm"):
            shapes[f"{prefix}.dwconv.{norm}.weight"] = shapes[f"{prefix}.dwconv.{norm}.bias"] = (
                mixed,
            )
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.bn.{name}"] = (width,)
    shapes[f"{prefix}.bn.num_batches_tracked"] = ()
    return shapes


@pytest.mark.parametrize("mixer", ["7x7", "gf"])
def test_horfpn_upernet_checkpoint_loads_strictly(tmp_path, mixer) -> None:
    """The head is written from the spec; the backbone (checked against the published key
    list above) is taken from the model, at depth 1 per stage to stay small."""
    name = f"horfpn_{mixer}_upernet_hornet_small_7x7"
    model = create_model(name, depths=(1, 1, 1, 1))
    backbone = {k: v.shape for k, v in model.state_dict().items() if k.startswith("backbone.")}
    head = {
        k: v
        for k, v in _uper_head_shapes().items()
        if not k.startswith("decode_head.fpn_bottleneck")
    }
    head = {k: _small_widths(k, v) for k, v in head.items()}
    gen = torch.Generator().manual_seed(1)
    state = {
        k: torch.tensor(7) if not shape else torch.rand(shape, generator=gen) + 0.5
        for k, shape in (backbone | head | _horfpn_bottleneck_shapes(mixer)).items()
    }
    path = tmp_path / f"{name}_512_160k_ade20k.pth"
    torch.save({"state_dict": state}, path)
    loaded = create_model(name, checkpoint=path, depths=(1, 1, 1, 1)).state_dict()
    key = "decode_head.fpn_bottleneck.pws.0.weight"
    torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)
