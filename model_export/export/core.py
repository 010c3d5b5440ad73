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

import importlib
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

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
    manifest = getattr(importlib.import_module(module), function)(model, Path(out_dir), options)
    for precision in options.verify_precisions:
        from model_export.export.precision import verify_precision

        manifest = verify_precision(out_dir, precision, options.say, options.verify_images)
    if options.int8_calibration is not None:
        manifest = int8.quantize_int8(
            out_dir, options.int8_calibration, options.min_agreement, options.say
        )
    return manifest


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
