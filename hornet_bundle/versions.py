"""Manifest schema versions: the one written, the ones read, and the upgrade between.

Version 2 (this one) names every parity figure after what it measures, where version 1
stored three different measures as `relative_error`, and records `export.batch` as
[min, opt, max] everywhere, where version 1 segmentation bundles wrote "dynamic". A
version 1 manifest is read by renaming its fields; its files (a `model_fp16.onnx`
included) stay as they are, since `engines` names each file.
"""

from __future__ import annotations

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
# Version 1 segmentation bundles: "batch": "dynamic" up to export.max_batch.
V1_SEGMENT_BATCH_OPT = 8

# Version 1 `relative_error` and `top1_agreement` meant, by task:
_V1_PARITY_NAMES = {
    "classify": ("relative_l2_error", "top1_agreement"),
    "segment": ("max_relative_error", "pixel_agreement"),
    "detect": ("box_score_error", "detections_paired"),
}


def upgrade(raw: dict) -> dict:
    """The manifest `raw` in the current schema version; raw itself is not changed."""
    version = raw.get("schema_version", SCHEMA_VERSION)
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"schema_version {version!r} cannot be read here: this hornet_bundle reads "
            f"versions {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}; a newer bundle "
            "needs a newer hornet-serve"
        )
    if version == SCHEMA_VERSION:
        return raw
    task = raw.get("task")
    parity = [_v1_parity(entry, task) for entry in raw.get("parity", [])]
    return raw | {
        "schema_version": SCHEMA_VERSION,
        "parity": parity,
        "export": _v1_export(raw.get("export", {})),
    }


def _v1_parity(entry: dict, task: str | None) -> dict:
    if task not in _V1_PARITY_NAMES or not isinstance(entry, dict):
        return entry
    error_name, agreement_name = _V1_PARITY_NAMES[task]
    entry = dict(entry)
    entry["metric"] = error_name
    entry[error_name] = entry.pop("relative_error", None)
    agreement = entry.pop("top1_agreement", None)
    if agreement is not None:
        entry[agreement_name] = agreement == 1.0 if task == "detect" else agreement
    return entry


def _v1_export(export: dict) -> dict:
    if not isinstance(export, dict) or export.get("batch") != "dynamic":
        return export
    maximum = export.get("max_batch")
    if not isinstance(maximum, int):
        return export
    rest = {k: v for k, v in export.items() if k != "max_batch"}
    return rest | {"batch": [1, min(V1_SEGMENT_BATCH_OPT, maximum), maximum]}
