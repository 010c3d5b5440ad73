"""Writing a bundle's `manifest.json` for the engine files already in its directory.

Writing goes through the schema, so an export can never produce a bundle the reader
refuses.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from hornet_bundle.files import MANIFEST_NAME, sha256_of
from hornet_bundle.manifest import Manifest
from hornet_bundle.reader import Bundle

# Distributions whose versions each manifest records (those installed).
TOOLS = (
    "torch",
    "torchvision",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxconverter-common",
    "tensorrt",
    "timm",
    "hornet-serve",
)


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_entries(bundle_dir: Path, names: list[str]) -> dict[str, dict]:
    return {
        name: {"sha256": sha256_of(bundle_dir / name), "bytes": (bundle_dir / name).stat().st_size}
        for name in names
    }


def write_manifest(bundle_dir: str | Path, fields: dict) -> Manifest:
    """Hash every engine file, validate the whole manifest, write it last.

    `fields` holds every Manifest field except `files` and `tools`, which are filled
    here from the directory's engine files and the installed packages.
    """
    bundle_dir = Path(bundle_dir)
    names = sorted({e["file"] for e in fields["engines"]} | set(fields.pop("extra_files", [])))
    manifest = Manifest.model_validate(
        fields | {"files": file_entries(bundle_dir, names), "tools": tool_versions()}
    )
    _write_manifest_file(bundle_dir, manifest)
    return manifest


def rewrite_manifest(bundle: Bundle, changes: dict) -> Manifest:
    """Write `bundle`'s manifest again with `changes` (top-level fields) applied: validated
    through the schema, its files hashed again, the export's `tools` kept. For records
    added after the export (`hornet verify`'s parity records, an int8 graph's engine
    entry): the files already listed are not touched, so their hashes stay those the
    loader checked; an engine file `changes` adds is hashed with them."""
    current = bundle.manifest.model_dump(mode="json")
    fields = {k: v for k, v in current.items() if k not in ("files", "tools")} | changes
    names = sorted(set(current["files"]) | {e["file"] for e in fields["engines"]})
    manifest = Manifest.model_validate(
        fields | {"files": file_entries(bundle.path, names), "tools": current["tools"]}
    )
    _write_manifest_file(bundle.path, manifest)
    return manifest


def _write_manifest_file(bundle_dir: Path, manifest: Manifest) -> None:
    """`manifest.json` replaced whole (a temporary file renamed over it): a server reading
    the bundle meanwhile (`--model-control-mode poll`) reads the old one or the new one,
    never a half-written file."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    temporary = bundle_dir / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, bundle_dir / MANIFEST_NAME)
    finally:
        temporary.unlink(missing_ok=True)
