"""A bundle is served only at a precision its manifest verified: fp32 (what it was
exported and checked in), an fp16 or int8 engine file with passed parity records (int8:
one per runtime, none failed), or a passed `hornet verify` record (bf16). Anything else
stops `hornet serve` with status 2 and one sentence saying how to verify it, unless
--allow-unverified-precision is given."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest

from hornet_bundle import Manifest, load_bundle
from service import cli
from service.engines import cpu_runs_bf16, unverified_precision
from service.settings import Settings
from service.testing import ServerNotReady, running_server
from tests.helpers import bundles, demo

PASSED_BF16 = {
    "engine": "model.onnx",
    "reference": "onnxruntime fp32 model.onnx",
    "precision": "bf16",
    "runtime": "openvino",
    "metric": "relative_l2_error",
    "tolerance": 2e-2,
    "passed": True,
    "max_abs_error": 0.01,
    "relative_l2_error": 0.005,
}


def _with_fp16_engine(directory: Path) -> Path:
    """A classifier whose manifest lists an fp16 graph (a copy of the fp32 one, which ONNX
    Runtime runs on the CPU) with no parity record for it."""
    bundles.write_classifier(directory)
    shutil.copy(directory / "model.onnx", directory / "model.fp16.onnx")
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    raw["engines"].append({"format": "onnx", "precision": "fp16", "file": "model.fp16.onnx"})
    raw["files"]["model.fp16.onnx"] = raw["files"]["model.onnx"]
    path.write_text(json.dumps(raw))
    return directory


def _manifest(classifier_dir: Path, parity: list[dict]) -> Manifest:
    raw = load_bundle(classifier_dir).manifest.model_dump(mode="json")
    return Manifest.model_validate(raw | {"parity": parity})


def _with_int8_engine(directory: Path) -> Path:
    """A classifier whose manifest lists an int8 graph (a copy of the fp32 one) with no
    parity record for it."""
    bundles.write_classifier(directory)
    shutil.copy(directory / "model.onnx", directory / "model.int8.onnx")
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    raw["engines"].append({"format": "onnx", "precision": "int8", "file": "model.int8.onnx"})
    raw["files"]["model.int8.onnx"] = raw["files"]["model.onnx"]
    path.write_text(json.dumps(raw))
    return directory


PASSED_INT8 = PASSED_BF16 | {
    "engine": "model.int8.onnx",
    "precision": "int8",
    "runtime": "onnxruntime",
    "tolerance": 0.5,
    "top1_agreement": 1.0,
    "min_top1_agreement": 0.99,
}


def test_fp32_is_verified_by_the_export_itself(classifier_dir) -> None:
    assert _manifest(classifier_dir, []).verified_precisions() == {"fp32"}


def test_a_passed_bf16_record_verifies_bf16(classifier_dir) -> None:
    assert _manifest(classifier_dir, [PASSED_BF16]).verified_precisions() == {"fp32", "bf16"}


def test_a_failed_record_verifies_nothing(classifier_dir) -> None:
    failed = PASSED_BF16 | {"passed": False}
    assert _manifest(classifier_dir, [failed]).verified_precisions() == {"fp32"}


def test_an_fp16_engine_files_passed_record_verifies_fp16(tmp_path) -> None:
    bundle_dir = _with_fp16_engine(tmp_path / "cls")
    fp16 = PASSED_BF16 | {"engine": "model.fp16.onnx", "precision": None}
    assert _manifest(bundle_dir, [fp16]).verified_precisions() == {"fp32", "fp16"}


def test_a_passed_int8_record_verifies_int8(tmp_path) -> None:
    bundle_dir = _with_int8_engine(tmp_path / "cls")
    assert _manifest(bundle_dir, [PASSED_INT8]).verified_precisions() == {"fp32", "int8"}


def test_one_failed_runtime_leaves_int8_unverified(tmp_path) -> None:
    """int8 is checked on each runtime that serves it: a failed OpenVINO record beside a
    passed ONNX Runtime one verifies nothing."""
    bundle_dir = _with_int8_engine(tmp_path / "cls")
    failed = PASSED_INT8 | {"runtime": "openvino", "passed": False, "top1_agreement": 0.9}
    assert _manifest(bundle_dir, [PASSED_INT8, failed]).verified_precisions() == {"fp32"}


def test_min_top1_agreement_is_written_only_when_set(classifier_dir) -> None:
    """Records without it read as before in a hornet-serve that predates the field."""
    records = _manifest(classifier_dir, [PASSED_BF16, PASSED_INT8]).model_dump(mode="json")
    assert ["min_top1_agreement" in r for r in records["parity"]] == [False, True]


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_the_demo_bundles_serve_on_openvino_at_fp32_without_verification(task) -> None:
    bundle = load_bundle(demo.bundle_dir(task))
    assert unverified_precision(bundle, Settings(engine="openvino")) is None


def test_serve_refuses_an_unverified_precision_in_one_sentence(classifier_dir, capsys) -> None:
    argv = ["--model-dir", str(classifier_dir), "--engine", "openvino", "--precision", "bf16"]
    assert cli.serve_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err == (
        f"hornet serve: bundle 'tiny_cls' ({classifier_dir}) has no passed parity record for "
        f"bf16: verify it on this machine with `hornet verify {classifier_dir} --precision "
        "bf16`, or pass --allow-unverified-precision to serve it unverified"
    )


def test_serve_refuses_an_fp16_graph_without_a_parity_record(tmp_path, capsys) -> None:
    bundle_dir = _with_fp16_engine(tmp_path / "cls")
    assert cli.serve_main(["--model-dir", str(bundle_dir), "--precision", "fp16"]) == 2
    assert "no passed parity record for fp16" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_serve_refuses_an_unverified_int8_graph_in_one_sentence(tmp_path, capsys, engine) -> None:
    bundle_dir = _with_int8_engine(tmp_path / "cls")
    argv = ["--model-dir", str(bundle_dir), "--engine", engine, "--precision", "int8"]
    assert cli.serve_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err == (
        f"hornet serve: bundle 'tiny_cls' ({bundle_dir}) has no passed parity record for int8: "
        "export it again with `hornet export ... --int8 --calibration DIR`, which verifies "
        "the int8 graph, or pass --allow-unverified-precision to serve it unverified"
    )


@pytest.mark.parametrize(
    "overrides", [{"engine": "tensorrt"}, {"device": "cuda"}, {"engine": "torch"}]
)
def test_int8_is_a_cpu_precision_of_onnxruntime_and_openvino(overrides) -> None:
    with pytest.raises(ValueError, match="precision int8 runs on the CPU"):
        Settings(precision="int8", **overrides)


@pytest.mark.parametrize(
    ("with_engine", "precision"), [(_with_int8_engine, "int8"), (_with_fp16_engine, "fp16")]
)
def test_allowed_unverified_precision_serves_its_file_with_a_warning(
    with_engine, precision, tmp_path
) -> None:
    bundle_dir = with_engine(tmp_path / "cls")
    log = tmp_path / "server.log"
    flags = ["--model-dir", str(bundle_dir), "--precision", precision]
    with running_server([*flags, "--allow-unverified-precision"], log_path=log) as server:
        models = json.load(urllib.request.urlopen(f"{server.url}/v1/models"))
    assert models["models"][0]["engine"].endswith(f"model.{precision}.onnx")
    assert "serving an unverified precision" in log.read_text()


def test_the_demo_bundles_serve_on_openvino(tmp_path) -> None:
    pytest.importorskip("openvino")
    with running_server(["--engine", "openvino"], log_path=tmp_path / "server.log") as server:
        models = json.load(urllib.request.urlopen(f"{server.url}/v1/models"))
    assert {m["engine"].split()[0] for m in models["models"]} == {"openvino"}
    assert len(models["models"]) == 3


def test_static_shapes_serve_a_request_in_pieces_as_onnx_runtime_does(tmp_path) -> None:
    """A real server with --openvino-static-shapes and a max batch of 4 answers a request
    of 7 images (its batches run as pieces of 4, 2 and 1) with ONNX Runtime's scores; its
    model list says which batch sizes it compiled, and the detector stays dynamic."""
    pytest.importorskip("openvino")
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (40 + 9 * i, 56, 3), dtype=np.uint8) for i in range(7)]
    answers = {}
    for engine in ("onnxruntime", "openvino"):
        flags = ["--engine", engine, "--max-batch-size", "4", "--openvino-static-shapes"]
        with running_server(flags, log_path=tmp_path / f"{engine}.log") as server:
            models = json.load(urllib.request.urlopen(f"{server.url}/v1/models"))
            reply = httpx.post(
                f"{server.url}/classify?top_k=3", files=demo.uploads(images), timeout=60
            )
        assert reply.status_code == 200, reply.text
        answers[engine] = reply.json()
        if engine == "openvino":
            described = {m["task"]: m["engine"] for m in models["models"]}
            assert described["classify"].endswith("static batches 4,2,1")
            assert described["segment"].endswith("static batches 4,2,1")
            assert "static" not in described["detect"]
    want, got = (answers[e]["results"] for e in ("onnxruntime", "openvino"))
    assert len(got) == len(want) == 7
    for expected, served in zip(want, got, strict=True):
        assert [p["index"] for p in served["top_k"]] == [p["index"] for p in expected["top_k"]]
        np.testing.assert_allclose(
            [p["score"] for p in served["top_k"]],
            [p["score"] for p in expected["top_k"]],
            atol=1e-4,
        )


@pytest.mark.skipif(cpu_runs_bf16(), reason="this CPU has bf16 arithmetic")
def test_allowed_unverified_bf16_still_needs_bf16_arithmetic(classifier_dir, tmp_path) -> None:
    pytest.importorskip("openvino")
    log = tmp_path / "server.log"
    flags = ["--model-dir", str(classifier_dir), "--engine", "openvino", "--precision", "bf16"]
    with pytest.raises(ServerNotReady):
        with running_server([*flags, "--allow-unverified-precision"], log_path=log):
            pass
    assert "needs a CPU with AVX512_BF16 or AMX-BF16" in log.read_text()


# --- verified on another CPU: a warning, not a refusal -------------------------------------


def _bundle_with(bundle_dir: Path, parity: list[dict]) -> Path:
    """The bundle with `parity` recorded too, as `hornet verify` records its own."""
    from hornet_bundle.writer import rewrite_manifest

    bundle = load_bundle(bundle_dir)
    rewrite_manifest(
        bundle, {"parity": [*bundle.manifest.model_dump(mode="json")["parity"], *parity]}
    )
    return bundle_dir


@pytest.mark.parametrize(
    ("runtime", "warned"),
    [
        ("onnxruntime on Imaginary CPU 9000", True),
        ("this CPU", False),  # runtime_on: the CPU that serves
        ("onnxruntime", False),  # a record that names no CPU
    ],
)
def test_a_precision_verified_on_another_cpu_is_said_so(tmp_path, runtime, warned) -> None:
    from hornet_bundle.host import cpu_model, runtime_on
    from service.engines import verified_elsewhere

    runtime = runtime_on("onnxruntime") if runtime == "this CPU" else runtime
    bundle_dir = _bundle_with(
        _with_int8_engine(tmp_path / "cls"), [PASSED_INT8 | {"runtime": runtime}]
    )
    settings = Settings(precision="int8")
    said = verified_elsewhere(load_bundle(bundle_dir), settings)
    assert unverified_precision(load_bundle(bundle_dir), settings) is None
    if not warned:
        assert said is None
        return
    assert said == (
        f"bundle 'tiny_cls' was verified at int8 on Imaginary CPU 9000, not on this CPU "
        f"({cpu_model()}), whose arithmetic may round differently: export it again with "
        "`hornet export ... --int8 --calibration DIR`, which verifies the int8 graph"
    )


def test_the_server_serves_a_precision_verified_elsewhere_and_logs_why(tmp_path) -> None:
    record = PASSED_INT8 | {"runtime": "onnxruntime on Imaginary CPU 9000"}
    bundle_dir = _bundle_with(_with_int8_engine(tmp_path / "cls"), [record])
    log = tmp_path / "server.log"
    flags = ["--model-dir", str(bundle_dir), "--precision", "int8"]
    with running_server(flags, log_path=log) as server:
        models = json.load(urllib.request.urlopen(f"{server.url}/v1/models"))
    assert models["models"][0]["engine"].endswith("model.int8.onnx")
    warnings = [json.loads(line) for line in log.read_text().splitlines() if "another CPU" in line]
    assert len(warnings) == 1 and "Imaginary CPU 9000" in warnings[0]["reason"]
