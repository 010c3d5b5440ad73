"""Checkpoint reading and adaptation.

Reads the authors' files unchanged (.pth with the state dict under `model`,
`model_ema` or `state_dict`, or bare; .safetensors) without ever unpickling arbitrary
objects, then adapts them to the model through one `checkpoint_filter_fn`: Global
Filter resizing, the 22k -> 1k head slice. Loading is strict and every mismatch is
named.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from model_export.gnconv import resize_complex_filter
from model_export.labels import HORNET_22K_CLASSES, in1k_rows_of_22k_head

STATE_DICT_KEYS = ("model", "model_ema", "state_dict")
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def file_sha256(path: str | PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason, in one line: torch's message around it
    suggests loading with weights_only=False (never, for a file from elsewhere) and
    carries terminal colour codes."""
    text = str(err)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    first = first.split(" Please use `torch.serialization", 1)[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", first)[:300]


def _check_record_sizes(path: Path) -> None:
    """torch.save writes a zip of uncompressed records, each as long as the data it holds.
    A checkpoint whose records claim more bytes than the file has (compressed records: a
    few kilobytes could claim gigabytes, which torch's reader would allocate and inflate)
    is refused before torch reads it, so that reading takes no more memory than the file
    is long. A file that does not begin as a zip (torch's legacy format; torch.load tells
    the two apart the same way) is left to torch.load."""
    with open(path, "rb") as file:
        if file.read(4) != b"PK\x03\x04":
            return
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except Exception as err:  # noqa: BLE001 - zipfile raises several kinds on damage
        raise CheckpointError(
            f"{path} is truncated, damaged or not a torch checkpoint (its zip directory: "
            f"{type(err).__name__}: {str(err)[:300]})"
        ) from err
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    claimed = sum(r.file_size for r in records)
    if compressed or claimed > path.stat().st_size:
        how = f", {len(compressed)} of them compressed" if compressed else ""
        raise CheckpointError(
            f"{path} is not a checkpoint as torch.save writes it: its zip records claim "
            f"{claimed} bytes in a file of {path.stat().st_size}{how}; load it with the "
            "torch that wrote it and save the state dict again"
        )


def read_checkpoint(path: str | PathLike) -> dict[str, torch.Tensor]:
    """The state dict stored in `path`, unwrapped from its training container."""
    return read_checkpoint_file(path)[0]


def read_checkpoint_file(path: str | PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict stored in `path` and the file's `meta` dict (mmcv/mmdet/mmseg
    files keep e.g. the label names under meta['CLASSES']; empty when absent)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path), {}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    _check_record_sizes(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if reason.startswith("Unsupported global"):
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers; refusing to "
                f"unpickle it (weights_only=True). Re-save only the state dict. ({reason})"
            ) from err
        raise CheckpointError(
            f"{path} is truncated, damaged or not a torch checkpoint ({reason})"
        ) from err
    except Exception as err:  # noqa: BLE001 - on a damaged file torch's readers raise anything
        # (a fuzz of damaged small checkpoints: IndexError, KeyError, UnicodeDecodeError,
        # struct.error, AssertionError, TypeError, and MemoryError from the legacy format)
        raise CheckpointError(
            f"{path} is truncated, damaged or not a torch checkpoint "
            f"({type(err).__name__}: {str(err)[:300]})"
        ) from err
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    return unwrap_state_dict(obj, source=str(path)), dict(meta) if isinstance(meta, Mapping) else {}


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(
            f"{source} has no tensors under {STATE_DICT_KEYS} or at its top level; "
            f"top-level keys: {sorted(map(str, obj))[:_MAX_LISTED]}"
        )
    return state


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Rename and reshape a released state dict to fit `model`.

    - `module.` prefixes (DistributedDataParallel) are dropped.
    - Global Filter `complex_weight`s are resized to the model's filter size (bilinear,
      align_corners=True), so a 224 checkpoint builds a 384 model and back.
    - A 10459-way HorNet-22k head loads into a 1000-way model by taking, for each
      ImageNet-1k synset, its row.
    """
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        target = own.get(key)
        if target is not None and key.endswith("complex_weight") and value.shape != target.shape:
            if value.shape[0] == target.shape[0] and value.shape[-1] == 2:
                value = resize_complex_filter(value.float(), tuple(target.shape[1:3])).to(
                    value.dtype
                )
        if (
            target is not None
            and key in ("head.weight", "head.bias")
            and value.shape[0] == HORNET_22K_CLASSES
            and target.shape[0] == 1000
        ):
            value = value[list(in1k_rows_of_22k_head())]
        out[key] = value
    return out


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """`load_state_dict(strict=True)` with an error that names every mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if state_dict[k].shape != own[k].shape
    )
    problems = []
    for what, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            shown = ", ".join(items[:_MAX_LISTED])
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            problems.append(f"{len(items)} {what}: {shown}{more}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}"
            f"{' ' + model.variant if hasattr(model, 'variant') else ''}: " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(model: nn.Module, path: str | PathLike) -> nn.Module:
    """Read, adapt and strictly load. A model class may bring its own adapter as a
    staticmethod `checkpoint_filter_fn(state_dict, model)` (e.g. mmseg layouts), and a
    method `apply_checkpoint_meta(meta, source)` that reads the file's `meta` (e.g. the
    label names of an mmdet file), called after the weights loaded."""
    state, meta = read_checkpoint_file(path)
    filter_fn = getattr(model, "checkpoint_filter_fn", None) or checkpoint_filter_fn
    load_state_dict_strict(model, filter_fn(state, model), source=str(path))
    apply_meta = getattr(model, "apply_checkpoint_meta", None)
    if apply_meta is not None:
        apply_meta(meta, str(path))
    return model
