"""The bundle loader serves a bundle only when every file matches its manifest."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from hornet_bundle import BundleError, load_bundle


@pytest.fixture
def bundle_copy(classifier_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(classifier_dir, tmp_path / "copy"))


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_valid_bundle_loads_with_its_manifest(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    assert bundle.name == "tiny_cls"
    assert bundle.manifest.task == "classify"
    assert bundle.file("model.onnx").is_file()


def test_edited_file_is_refused_naming_it(bundle_copy: Path) -> None:
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 .* does not match"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused_by_size(bundle_copy: Path) -> None:
    data = (bundle_copy / "model.onnx").read_bytes()
    (bundle_copy / "model.onnx").write_bytes(data[:-10])
    with pytest.raises(BundleError, match=r"model\.onnx: \d+ bytes, but manifest.json says"):
        load_bundle(bundle_copy)


def test_wrong_sha256_in_manifest_is_refused(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda m: m["files"]["model.onnx"].update(sha256="0" * 64))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused_naming_it(bundle_copy: Path) -> None:
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: listed in manifest.json but missing"):
        load_bundle(bundle_copy)


def test_invalid_manifest_is_refused_naming_the_field(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda m: m.update(taks="classify"))
    with pytest.raises(BundleError, match=r"manifest.json: invalid manifest: taks"):
        load_bundle(bundle_copy)


def test_manifest_that_is_not_json_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(bundle_copy)


def test_directory_without_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(tmp_path)


def test_file_outside_the_bundle_is_refused(bundle_copy: Path) -> None:
    def escape(manifest: dict) -> None:
        manifest["files"]["../outside.onnx"] = manifest["files"]["model.onnx"]

    _edit_manifest(bundle_copy, escape)
    with pytest.raises(BundleError, match="lies outside the bundle"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"input_size": [0, 0]},
            "preprocess.input_size.0: Input should be greater than or equal to 1",
        ),
        ({"input_size": [100_000, 100_000]}, "less than or equal to 8192"),  # 28 GiB warm-up
        ({"input_size": [64, 65]}, "preprocess.input_size [64, 65] is not the size of input"),
        ({"crop_pct": 0}, "preprocess.crop_pct: Input should be greater than 0"),
    ],
)
def test_a_manifest_s_preprocessing_is_bounded_and_fits_its_graph(
    classifier_dir, tmp_path, change, said
) -> None:
    """Before, these loaded, and the first batch (the warm-up) failed with the runtime's
    message ("index: 2 Got: 65 Expected: 96"), or numpy's ("Unable to allocate 27.9
    GiB"), or would have taken the memory."""
    bundle = tmp_path / "b"
    shutil.copytree(classifier_dir, bundle)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["preprocess"] |= change
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=re.escape(said)):
        load_bundle(bundle)


@pytest.mark.parametrize("bundle", ["classifier_dir", "segmenter_dir"])
@pytest.mark.parametrize("change", [-1, 1])
def test_a_manifest_has_one_label_per_class(request, tmp_path, bundle, change) -> None:
    """Before, a classifier with a label too few loaded and answered 500 (IndexError) for
    every image whose top class had none."""
    copy = tmp_path / "b"
    shutil.copytree(request.getfixturevalue(bundle), copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["labels"] = raw["labels"][:-1] if change < 0 else [*raw["labels"], "one more"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"labels for the \d+ classes of output 'logits'"):
        load_bundle(copy)


@pytest.mark.parametrize(
    ("window", "said"),
    [
        ({"crop": [128, 128], "stride": [129, 64]}, "stride [129, 64] is past crop [128, 128]"),
        ({"crop": [96, 96], "stride": [64, 64]}, "sliding_window.crop [96, 96] is not"),
    ],
)
def test_a_segmenter_s_tiles_are_its_input_and_cover_the_image(
    segmenter_dir, tmp_path, window, said
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(segmenter_dir, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["preprocess"]["sliding_window"] = window
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=re.escape(said)):
        load_bundle(copy)


def test_a_bundle_s_signature_leaves_out_what_an_export_in_progress_writes(
    classifier_dir, tmp_path
) -> None:
    """--model-control-mode poll reloads a bundle whose signature changes: an export
    writing its next version under `.export-XXXX` in the bundle, or a manifest being
    written as a hidden file, is not a change until the files are moved in."""
    from service.runtime import bundle_signature

    bundle = tmp_path / "b"
    shutil.copytree(classifier_dir, bundle)
    before = bundle_signature(bundle)
    staging = bundle / ".export-abc" / "b"
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(b"the next version, half written")
    (bundle / ".manifest.json.12.tmp").write_text("{")
    assert bundle_signature(bundle) == before
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b" ")
    assert bundle_signature(bundle) != before
