"""Official-format checkpoints: round trips, resizing, 22k -> 1k, and bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_export import create_model
from model_export.checkpoint import CheckpointError, read_checkpoint
from model_export.labels import (
    hornet22k_synsets,
    imagenet1k_synsets,
    in1k_rows_of_22k_head,
    labels_for,
)

from .conftest import TINY, randomize_


def _trained(name="hornet_tiny_gf", seed=0, **kw):
    return randomize_(create_model(name, **TINY, **kw), seed)


@pytest.mark.parametrize("layout", ["model", "model_ema", "bare", "module_prefix", "safetensors"])
def test_official_layouts_round_trip_to_identical_outputs(tmp_path, images, layout):
    source = _trained()
    state = source.state_dict()
    path = tmp_path / ("ckpt.safetensors" if layout == "safetensors" else "ckpt.pth")
    if layout == "model":
        torch.save({"model": state, "epoch": 299, "optimizer": {"lr": torch.tensor(1e-3)}}, path)
    elif layout == "model_ema":
        torch.save({"model_ema": state, "epoch": 299}, path)
    elif layout == "bare":
        torch.save(state, path)
    elif layout == "module_prefix":
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    loaded = create_model("hornet_tiny_gf", checkpoint=path, **TINY)
    with torch.no_grad():
        want, got = source(images), loaded(images)
    assert want.abs().max() > 1e-2  # non-trivial network: the check can fail
    assert torch.equal(want, got)


def test_gf_filters_resize_so_224_weights_serve_at_384_and_back(tmp_path):
    source = _trained()
    path = tmp_path / "t224.pth"
    torch.save({"model": source.state_dict()}, path)
    big = create_model("hornet_tiny_gf", checkpoint=path, image_size=384, **TINY)
    assert big.pretrained_cfg.input_size == (3, 384, 384) and big.pretrained_cfg.crop_pct == 1.0
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # the 224 model resizes its filters at run time for a 384 input: same numbers
        torch.testing.assert_close(big(x), source(x), rtol=1e-5, atol=1e-5)
    path384 = tmp_path / "t384.pth"
    torch.save({"model": big.state_dict()}, path384)
    back = create_model("hornet_tiny_gf", checkpoint=path384, **TINY)
    shapes = {k: v.shape for k, v in back.state_dict().items()}
    assert shapes == {k: v.shape for k, v in source.state_dict().items()}


def test_22k_head_loads_as_itself_and_as_imagenet_1k(tmp_path, images):
    source = _trained("hornet_large_gf")
    assert source.head.out_features == 10459
    path = tmp_path / "l22k.pth"
    torch.save({"model": source.state_dict()}, path)
    as22k = create_model("hornet_large_gf", checkpoint=path, **TINY)
    as1k = create_model("hornet_large_gf", checkpoint=path, num_classes=1000, **TINY)
    assert as1k.pretrained_cfg.label_set == "imagenet-1k"
    with torch.no_grad():
        full, sliced = as22k(images), as1k(images)
    rows = list(in1k_rows_of_22k_head())
    torch.testing.assert_close(sliced, full[:, rows], rtol=1e-6, atol=1e-6)
    # each 1k output is the 22k row of the same synset (and so the same name)
    syn22k, syn1k = hornet22k_synsets(), imagenet1k_synsets()
    assert [syn22k[r] for r in rows] == list(syn1k)
    names22k, names1k = labels_for("hornet-22k", 10459), labels_for("imagenet-1k", 1000)
    assert [names22k[r] for r in rows] == names1k
    # the nine synsets the w21 list lacks are the last nine rows
    extras = [
        "n02085782",
        "n02089078",
        "n02089867",
        "n02089973",
        "n02091635",
        "n02108000",
        "n02112706",
        "n02113978",
        "n04399382",
    ]
    assert [rows[syn1k.index(s)] for s in extras] == list(range(10450, 10459))


def test_label_lists_are_human_readable_and_unique_per_synset():
    names = labels_for("imagenet-1k", 1000)
    assert names[0].startswith("tench") and names[1].startswith("goldfish") and len(names) == 1000
    assert len(set(hornet22k_synsets())) == 10459


def test_a_checkpoint_of_another_variant_is_refused_with_the_mismatches_named(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(
        {"model": create_model("hornet_small_gf", **TINY | {"base_dim": 64}).state_dict()}, path
    )
    with pytest.raises(
        CheckpointError, match=r"shape mismatches: .*downsample_layers\.0\.0\.weight"
    ):
        create_model("hornet_tiny_gf", checkpoint=path, **TINY)


def test_a_7x7_checkpoint_into_a_gf_model_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "t7.pth"
    torch.save({"model": create_model("hornet_tiny_7x7", **TINY).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        create_model("hornet_tiny_gf", checkpoint=path, **TINY)
    assert "missing keys" in str(err.value) and "complex_weight" in str(err.value)
    assert "unexpected keys" in str(err.value)


def test_a_missing_key_is_named(tmp_path):
    state = create_model("hornet_tiny_gf", **TINY).state_dict()
    del state["head.bias"]
    path = tmp_path / "m.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys: head\.bias"):
        create_model("hornet_tiny_gf", checkpoint=path, **TINY)


def test_a_truncated_file_is_refused_clearly(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"model": create_model("hornet_tiny_gf", **TINY).state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, damaged or not a torch checkpoint"):
        create_model("hornet_tiny_gf", checkpoint=path, **TINY)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_pickle_carrying_an_arbitrary_object_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.target = str(marker)
    path = tmp_path / "evil.pth"
    torch.save(
        {"model": create_model("hornet_tiny_gf", **TINY).state_dict(), "x": payload},
        path,
        pickle_module=pickle,
    )
    with pytest.raises(CheckpointError, match="refusing to unpickle") as raised:
        create_model("hornet_tiny_gf", checkpoint=path, **TINY)
    assert not marker.exists()
    # the unpickler's reason alone: torch's text around it advised weights_only=False
    # and carried terminal colour codes
    assert "Unsupported global: GLOBAL" in str(raised.value)
    assert "False" not in str(raised.value) and "\x1b" not in str(raised.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("hornet_tiny_gf", checkpoint=tmp_path / "nope.pth", **TINY)


def test_a_checkpoint_with_compressed_records_is_refused_before_torch_reads_it(tmp_path):
    """torch.save writes uncompressed records; a compressed one could claim gigabytes in a
    few kilobytes, which torch's reader allocates and inflates (here 64 MiB of zeros in a
    file of under 100 KiB, which torch would load)."""
    import zipfile

    saved = tmp_path / "saved.pth"
    torch.save({"model": {"w": torch.zeros(16 << 20)}}, saved)
    packed = tmp_path / "packed.pth"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(packed, "w") as target:
        for record in source.infolist():
            target.writestr(record.filename, source.read(record), zipfile.ZIP_DEFLATED)
    assert packed.stat().st_size < 100_000
    assert torch.load(packed, weights_only=True)["model"]["w"].numel() == 16 << 20
    with pytest.raises(CheckpointError, match=r"claim \d+ bytes in a file of \d+, \d+ of them"):
        read_checkpoint(packed)


FUZZ = """
import collections, io, json, random, resource, sys, warnings
import torch
from model_export.checkpoint import CheckpointError, read_checkpoint_file
warnings.simplefilter("ignore")
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.RLIM_INFINITY))
state = {"model": {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(5)}, "meta": {"x": 1}}
forms = []
for zipped in (True, False):
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=zipped)
    forms.append(buffer.getvalue())
rng, outcomes, path = random.Random(11), collections.Counter(), sys.argv[1]
for case in range(int(sys.argv[2])):
    data = bytearray(forms[case % 2])
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        if len(data) < 2:
            break
        where = rng.randrange(len(data))
        kind = rng.random()
        if kind < 0.5:
            data[where] = rng.randrange(256)
        elif kind < 0.7:
            del data[where : where + rng.randrange(1, 64)]
        elif kind < 0.85:
            data[where:where] = rng.randbytes(rng.randrange(1, 16))
        else:
            data = data[: max(where, 1)]
    open(path, "wb").write(data)
    try:
        read_checkpoint_file(path)
        outcomes["read"] += 1
    except CheckpointError:
        outcomes["refused"] += 1
    except BaseException as exc:
        outcomes[type(exc).__name__] += 1
print(json.dumps(outcomes))
"""


def test_damaged_checkpoints_are_read_or_refused_never_anything_else(tmp_path):
    """600 small checkpoints (torch.save's zip and legacy forms) with random bytes changed,
    cut or inserted, read under a 6 GiB address-space limit: before, torch's readers
    raised IndexError, KeyError, UnicodeDecodeError, struct.error, AssertionError,
    TypeError or MemoryError (the legacy form's sizes) out of `hornet export`."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FUZZ, str(tmp_path / "case.pth"), "600"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    outcomes = json.loads(done.stdout)
    assert set(outcomes) <= {"read", "refused"}, outcomes
    assert outcomes["refused"] > 300  # most damage is found
