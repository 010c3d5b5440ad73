"""Reading a model bundle: read `manifest.json`, validate it, verify every listed file.

A bundle that does not match its manifest (an edited, truncated or missing file, an
invalid manifest) is refused with a `BundleError` naming the file, before any engine
sees it: serving the wrong weights silently is the failure this guards against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from hornet_bundle.files import MANIFEST_NAME, inside_bundle, sha256_of
from hornet_bundle.manifest import Manifest


class BundleError(ValueError):
    """A bundle directory that cannot be served as it is."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    def file(self, name: str) -> Path:
        """Absolute path of one of the bundle's listed files."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: {name!r} is not listed in {MANIFEST_NAME}")
        return self.path / name


def _read_manifest(path: Path) -> Manifest:
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; a bundle directory needs {MANIFEST_NAME}")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise BundleError(f"{manifest_path}: invalid manifest: {problems}") from exc


def _verify_file(root: Path, name: str, expected_sha256: str, expected_bytes: int) -> None:
    if not inside_bundle(name):
        raise BundleError(f"{root / MANIFEST_NAME}: file {name!r} lies outside the bundle")
    path = root / PurePosixPath(name)
    if not path.is_file():
        raise BundleError(f"{path}: listed in {MANIFEST_NAME} but missing")
    size = path.stat().st_size
    if size != expected_bytes:
        raise BundleError(
            f"{path}: {size} bytes, but {MANIFEST_NAME} says {expected_bytes}; "
            "the file was modified or truncated"
        )
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise BundleError(
            f"{path}: sha256 {actual} does not match {expected_sha256} in {MANIFEST_NAME}; "
            "the file was modified"
        )


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify the bundle at `path`; raise `BundleError` naming what is wrong."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory (a bundle is a directory with {MANIFEST_NAME})")
    manifest = _read_manifest(root)
    for name, entry in manifest.files.items():
        _verify_file(root, name, entry.sha256, entry.bytes)
    return Bundle(path=root, manifest=manifest)
