"""The one export entry point: a variant name or a built model becomes a verified bundle.

    export("hornet_tiny_7x7", "bundles/t7", ExportOptions(checkpoint="t7.pth", fp16=True))
    export(model, "bundles/shapes_seg", ExportOptions(labels=["background", ...]))

A variant is built from the registry (with options.checkpoint, num_classes,
image_size); a model passed in must carry a `pretrained_cfg` (create_model gives it
one) and gets options.checkpoint loaded into it, in place. The model's task picks the
exporter (classify, segment, detect), imported only then: this module needs no torch
until an export runs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

from hornet_bundle import MANIFEST_NAME
from hornet_bundle.files import inside_bundle
from model_export.export.options import ExportOptions

if TYPE_CHECKING:
    from torch import nn

    from hornet_bundle import Manifest

# Precisions model_export.export.precision verifies (kept here: it imports numpy).
VERIFIABLE_PRECISIONS = ("bf16",)
# task -> (module, function) of its exporter
EXPORTERS = {
    "classify": ("model_export.export.classify", "export_classifier"),
    "segment": ("model_export.export.segment", "export_segmentation"),
    "detect": ("model_export.export.detect", "export_detection"),
}


def export(
    variant_or_model: str | nn.Module,
    out_dir: str | PathLike,
    options: ExportOptions | None = None,
) -> Manifest:
    """Export to a verified bundle in `out_dir` and return its manifest.

    Raises ValueError (invalid options, a missing checkpoint, an unknown variant is a
    KeyError), CheckpointError (weights that do not fit), ParityError (after writing
    the bundle, its parity records marked failed) or ExportError (any other step).
    Each of options.verify_precisions is then checked and recorded on the written bundle
    (model_export.export.precision), and with options.int8_calibration an int8 graph is
    written and verified (model_export.export.int8), failing the same way.

    All of it is written in a hidden directory in `out_dir` (`staged`) and moved into
    `out_dir` once the bundle's manifest is written (`publish`), even where a step after
    that fails; an export that fails or is stopped before leaves `out_dir` as it was.
    """
    options = options or ExportOptions()
    unknown = set(options.verify_precisions) - set(VERIFIABLE_PRECISIONS)
    if unknown:
        raise ValueError(
            f"cannot verify precisions {sorted(unknown)}; verifiable: {VERIFIABLE_PRECISIONS}"
        )
    if options.verify_images is not None:
        from model_export.export.precision import verification_files

        if not options.verify_precisions:
            raise ValueError("verify_images needs a precision to verify (verify_precisions)")
        verification_files(options.verify_images)  # a missing or empty folder: before export
    model = _model(variant_or_model, options)
    task = getattr(getattr(model, "pretrained_cfg", None), "task", None)
    if task not in EXPORTERS:
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg with a task in {sorted(EXPORTERS)}; "
            "build it with model_export.create_model"
        )
    if options.int8_calibration is not None:
        from model_export.export import int8

        int8.check_task(task)
        int8.check_min_agreement(options.min_agreement)
        int8.calibration_files(options.int8_calibration)
    module, function = EXPORTERS[task]
    exporter = getattr(importlib.import_module(module), function)
    out = Path(out_dir)
    with staged(out) as bundle_dir:
        try:
            manifest = exporter(model, bundle_dir, options)
            for precision in options.verify_precisions:
                from model_export.export.precision import verify_precision

                manifest = verify_precision(
                    bundle_dir, precision, options.say, options.verify_images
                )
            if options.int8_calibration is not None:
                manifest = int8.quantize_int8(
                    bundle_dir, options.int8_calibration, options.min_agreement, options.say
                )
        except BaseException as err:
            # A bundle whose manifest was written is complete (its records may say a check
            # failed, a later step may not have run: as the error says) and is published;
            # before that, `out` is left as it was. The error names `out`, not the staging.
            if (bundle_dir / MANIFEST_NAME).is_file():
                publish(bundle_dir, out)
            err.args = tuple(
                arg.replace(str(bundle_dir), str(out)) if isinstance(arg, str) else arg
                for arg in err.args
            )
            raise
        publish(bundle_dir, out)
    return manifest


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A directory of `out`'s name to write the bundle into, inside a hidden directory in
    `out` (`out/.export-XXXX/NAME`: the same file system, so `publish` renames, and no
    other directory need be writable; a server polling `out` does not look at hidden
    entries), removed afterwards whatever happened, with `out` itself where this made
    it and nothing was published. An export that fails or is stopped before `publish`
    leaves `out` as it was: a served bundle exported again is replaced only by a
    written one (a kill -9 leaves the hidden directory behind)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a directory for the bundle")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        bundle_dir = holder / out.resolve().name
        bundle_dir.mkdir()
        yield bundle_dir
    finally:
        shutil.rmtree(holder, ignore_errors=True)
        if made and not any(out.iterdir()):
            out.rmdir()


def publish(bundle_dir: Path, out: Path) -> None:
    """Move the bundle written in `bundle_dir` into `out`: each file its manifest lists
    by an atomic rename (a reader never sees one half written), the manifest last, so a
    loader in between sees new files under the old manifest and refuses the bundle
    (hash mismatch) rather than serving a mixture; then the files only the old manifest
    listed are removed. Other files in `out` are left alone."""
    written = json.loads((bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]
    before = _listed_files(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in written:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(bundle_dir / name, target)
    os.replace(bundle_dir / MANIFEST_NAME, out / MANIFEST_NAME)
    for name in sorted(before - set(written)):
        (out / name).unlink(missing_ok=True)


def _listed_files(out: Path) -> set[str]:
    """The files the manifest in `out` lists (names inside the bundle only), or none."""
    try:
        files = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in files if isinstance(name, str) and inside_bundle(name)}


def _model(variant_or_model: str | nn.Module, options: ExportOptions) -> nn.Module:
    """The model to export, in eval mode, with options.checkpoint loaded."""
    checkpoint = options.checkpoint
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if isinstance(variant_or_model, str):
        from model_export.registry import create_model

        source = f" from {checkpoint}" if checkpoint else " (RANDOM weights)"
        options.say(f"building {variant_or_model}{source}")
        return create_model(
            variant_or_model,
            checkpoint=checkpoint,
            num_classes=options.num_classes,
            image_size=options.image_size,
        )
    if checkpoint is not None:
        from model_export.checkpoint import load_checkpoint

        options.say(f"loading {checkpoint}")
        load_checkpoint(variant_or_model, checkpoint)
    return variant_or_model.eval()
