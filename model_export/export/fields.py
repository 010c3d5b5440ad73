"""Manifest fields every exporter fills the same way: the model's config for its task,
the labels, the weights record, the uint8 image input and the engine entries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

from torch import nn

from hornet_bundle import Weights, sha256_of
from model_export.export.options import ExportOptions
from model_export.labels import labels_for
from model_export.registry import PretrainedCfg


def variant_of(model: nn.Module) -> str:
    return getattr(model, "variant", type(model).__name__)


def task_cfg(model: nn.Module, task: str) -> PretrainedCfg:
    """The model's pretrained_cfg, which must be of `task`."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        raise ValueError("model has no pretrained_cfg; build it with model_export.create_model")
    if cfg.task != task:
        raise ValueError(
            f"{variant_of(model)} is a {cfg.task!r} model; this exporter writes {task!r} bundles"
        )
    return cfg


def manifest_labels(
    cfg: PretrainedCfg, num_classes: int, labels: Sequence[str] | None = None
) -> list[str]:
    """One name per output class: `labels`, else cfg.extra['labels'], else the label set."""
    source = "labels argument"
    if labels is None:
        labels, source = cfg.extra.get("labels"), "pretrained_cfg.extra['labels']"
    if labels is None:
        return labels_for(cfg.label_set, num_classes)
    labels = [str(name) for name in labels]
    if len(labels) != num_classes:
        raise ValueError(
            f"{source} has {len(labels)} names but the model has {num_classes} output classes"
        )
    return labels


def weights_record(checkpoint: str | PathLike | None, cfg: PretrainedCfg) -> Weights:
    """Where the weights came from: the checkpoint file and its sha256, or random (unless
    the model's config says it was trained in this process, as the demo models are)."""
    if checkpoint is None:
        return Weights(random=not cfg.extra.get("trained", False))
    return Weights(
        random=False, checkpoint=Path(checkpoint).name, checkpoint_sha256=sha256_of(checkpoint)
    )


def bundle_identity(
    model: nn.Module, options, task: str, name: str, describe: Callable[[str, Weights], str]
) -> dict:
    """The manifest's name, variant, task, demo flag, description and weights; `name`
    and `describe(variant, weights)` give the task's defaults, the options' own win."""
    variant = variant_of(model)
    weights = weights_record(options.checkpoint, model.pretrained_cfg)
    return {
        "name": options.name or name,
        "variant": variant,
        "task": task,
        "demo": options.demo,
        "description": options.description or describe(variant, weights),
        "weights": weights.model_dump(),
    }


def export_record(facts: dict, options: ExportOptions) -> dict:
    """The manifest's `export` record: the exporter's `facts`, then options.export_extra."""
    extra = dict(options.export_extra or {})
    clashes = sorted(facts.keys() & extra.keys())
    if clashes:
        raise ValueError(f"export_extra may not replace what the exporter records: {clashes}")
    return facts | extra


def image_input(shape: list[int], description: str) -> dict:
    """The uint8 RGB NHWC image input every graph takes (normalised inside)."""
    return {
        "name": "image",
        "dtype": "uint8",
        "layout": "NHWC",
        "shape": shape,
        "description": description,
    }


def detection_outputs(boxes: str, masks: dict) -> list[dict]:
    """The detection graphs' outputs: boxes (`boxes` says in which pixels), labels,
    scores, and masks (`masks`: shape, layout, description; they differ by exporter)."""
    return [
        {"name": "boxes", "dtype": "float32", "shape": [-1, 4], "description": boxes},
        {"name": "labels", "dtype": "int64", "shape": [-1], "description": "index into labels"},
        {"name": "scores", "dtype": "float32", "shape": [-1]},
        {"name": "masks", "dtype": "float32", **masks},
    ]


def onnx_engine(
    file: str, precision: str, gf_mode: str, batch: tuple[int, int, int] | None = None
) -> dict:
    return {
        "format": "onnx",
        "precision": precision,
        "file": file,
        "gf_mode": gf_mode,
        "batch_profile": batch,
    }
