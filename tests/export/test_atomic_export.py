"""An export replaces its output directory's bundle only once the new one is written and
verified: it writes beside it, in a hidden directory, and then renames the files in, the
manifest last. A failed or interrupted export leaves a served bundle as it was."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hornet_bundle import load_bundle
from hornet_bundle.writer import rewrite_manifest
from model_export import create_model
from model_export.export import ExportOptions, classify, export

from ..models.conftest import TINY, randomize_


def _model(seed: int):
    return randomize_(create_model("hornet_tiny_7x7", **TINY, image_size=64), seed=seed)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A bundle as a model repository holds it: exported once, a file of the user's beside."""
    out = tmp_path_factory.mktemp("repository") / "tiny"
    export(_model(1), out, ExportOptions(fp16=True))
    (out / "NOTES.txt").write_text("the operator's own file")
    return out


def test_the_export_writes_its_bundle_and_nothing_else_beside_it(served: Path) -> None:
    assert load_bundle(served).name == "tiny"  # named after --out, not the hidden folder
    assert sorted(p.name for p in served.parent.iterdir()) == ["tiny"]
    assert not [p for p in served.iterdir() if p.name.startswith(".")]
    assert sorted(_digests(served)) == [
        "NOTES.txt",
        "manifest.json",
        "model.fp16.onnx",
        "model.onnx",
    ]


@pytest.mark.parametrize("failure", [RuntimeError("the verification broke"), KeyboardInterrupt()])
def test_a_failed_export_leaves_the_bundle_there_as_it_was(
    served: Path, monkeypatch, failure: BaseException
) -> None:
    """Before, the export wrote over the served bundle's model.onnx first and failed
    later (or was killed: a Kubernetes Job past its deadline or memory): the old manifest
    then refused the new graph, and the model did not load after a restart."""
    before = _digests(served)

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(classify, "_verify", broken)  # after model.onnx is written
    with pytest.raises(type(failure)):
        export(_model(2), served, ExportOptions())
    assert _digests(served) == before
    load_bundle(served)
    assert sorted(p.name for p in served.parent.iterdir()) == ["tiny"]  # nothing left


def test_a_new_export_replaces_the_bundle_s_files_and_keeps_the_others(
    served: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "tiny"
    shutil.copytree(served, out)
    old = load_bundle(out).manifest
    manifest = export(_model(3), out, ExportOptions())  # no fp16 this time
    bundle = load_bundle(out)
    assert bundle.manifest == manifest and bundle.name == "tiny"
    assert manifest.files["model.onnx"].sha256 != old.files["model.onnx"].sha256
    # the file only the old bundle listed is gone; the operator's file stays
    assert sorted(_digests(out)) == ["NOTES.txt", "manifest.json", "model.onnx"]
    assert (out / "NOTES.txt").read_text() == "the operator's own file"


def test_a_parity_failure_still_writes_the_failed_bundle_for_inspection(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(classify, "FP32_TOLERANCE", 1e-12)
    out = tmp_path / "failing"
    with pytest.raises(Exception, match="parity check failed"):
        export(_model(4), out, ExportOptions())
    assert load_bundle(out).manifest.parity[0].passed is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing"]


def test_a_manifest_is_replaced_whole_never_rewritten_in_place(served: Path, tmp_path) -> None:
    """A server polling the repository reads the old manifest or the new one: the new is
    a new file renamed over the old (a reader holding the old one reads it to its end)."""
    import shutil

    out = tmp_path / "tiny"
    shutil.copytree(served, out)
    bundle = load_bundle(out)
    with (out / "manifest.json").open(encoding="utf-8") as reader:
        inode = os.fstat(reader.fileno()).st_ino
        rewrite_manifest(bundle, {"description": "described again"})
        assert json.loads(reader.read()) == bundle.manifest.model_dump(mode="json")
    assert os.stat(out / "manifest.json").st_ino != inode
    assert load_bundle(out).manifest.description == "described again"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_failed_first_export_leaves_no_directory(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("the verification broke")

    monkeypatch.setattr(classify, "_verify", broken)
    with pytest.raises(RuntimeError):
        export(_model(5), tmp_path / "new" / "tiny", ExportOptions())
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == []


def test_an_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tiny").write_text("a file")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        export(_model(6), tmp_path / "tiny", ExportOptions())
