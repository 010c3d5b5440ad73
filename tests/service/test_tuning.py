"""`hornet tune BUNDLE`: the candidates it measures are those the server could run here;
each runs (a real `hornet tune` process, each candidate in its own); an unverified
precision is measured but never recommended; and the flags it recommends are ones
`hornet serve` parses into the very candidate it names."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hornet_bundle import load_bundle
from service.cli import load_settings
from service.engines import cpu_runs_bf16
from service.settings import Settings
from service.testing import running_server
from service.tuning import (
    BATCH_NEAR,
    Candidate,
    Measured,
    at_recommended_batch,
    batch_sizes,
    best,
    candidates,
    report,
)
from tests.helpers import demo
from tests.helpers.images import encode

HORNET = [sys.executable, "-m", "hornet_cli"]


def _with_int8_entry(source: Path, target: Path) -> Path:
    """A copy of a bundle whose manifest also lists its graph as the int8 one."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["engines"].append({"format": "onnx", "precision": "int8", "file": "model.onnx"})
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_candidates_are_what_the_server_could_run_here(tmp_path) -> None:
    classify = load_bundle(_with_int8_entry(demo.bundle_dir("classify"), tmp_path / "c"))
    found = candidates(classify, cpus=4, openvino=True)
    bf16 = ["bf16"] if cpu_runs_bf16() else []
    expected = [
        Candidate("onnxruntime", precision, instances, threads)
        for precision in ("fp32", "int8")
        for instances, threads in ((1, 4), (4, 1))
    ] + [
        Candidate("openvino", precision, instances, threads, static)
        for precision in ("fp32", *bf16, "int8")
        for instances, threads in ((1, 4), (4, 1))
        for static in (False, True)
    ]
    assert found == expected
    # Without OpenVINO, with one CPU, and with no int8 graph: ONNX Runtime fp32 alone.
    alone = candidates(load_bundle(demo.bundle_dir("classify")), cpus=1, openvino=False)
    assert alone == [Candidate("onnxruntime", "fp32", 1, 1)]
    # A detector's input size varies: no static shapes for it.
    detect = candidates(load_bundle(demo.bundle_dir("detect")), cpus=2, openvino=True)
    assert detect and not any(c.static_shapes for c in detect)


def test_the_fastest_verified_candidate_is_recommended() -> None:
    fast_unverified = Measured(Candidate("openvino", "bf16", 2, 1), 90.0, unverified="no record")
    broken = Measured(Candidate("openvino", "int8", 2, 1), error="cannot")
    slow = Measured(Candidate("onnxruntime", "fp32", 1, 2), 40.0)
    fast = Measured(Candidate("onnxruntime", "fp32", 2, 1), 50.0)
    assert best([fast_unverified, broken, slow, fast]) is fast
    assert best([fast_unverified, broken]) is None


def test_hornet_tune_measures_every_candidate_and_recommends_flags_serve_takes(
    classifier_dir,
) -> None:
    """A real `hornet tune` on the test classifier (verified for fp32 only): every
    candidate runs, bf16 ones are marked unverified, and the recommended command's flags,
    parsed by `hornet serve`'s own parser, are the fastest verified row's."""
    done = subprocess.run(
        [*HORNET, "tune", str(classifier_dir), "--seconds", "0.3", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    for row in rows:  # JSON's keys are strings
        row["by_batch"] = {int(size): rate for size, rate in row["by_batch"].items()}
        assert row.pop("model") == "tiny_cls"
    measured = [Measured(Candidate(**row.pop("candidate")), **row) for row in rows]
    assert [m.candidate for m in measured] == candidates(load_bundle(classifier_dir), _cpus(done))
    for result in measured:
        assert result.error is None, result
        assert result.images_per_s > 0 and result.lone_ms > 0
        # Every power of two up to --max-batch-size measured; the recommended size is
        # the smallest within BATCH_NEAR of the fastest, and its figure the row's.
        assert list(result.by_batch) == [1, 2, 4, 8]
        fastest = max(result.by_batch.values())
        near = [s for s, r in result.by_batch.items() if r >= (1 - BATCH_NEAR) * fastest]
        assert result.batch_size == min(near)
        assert result.images_per_s == result.by_batch[result.batch_size]
        # One single-thread engine per CPU: the solo engine's lone image measured too.
        per_cpu = result.candidate.instances > 1 and result.candidate.threads == 1
        assert (result.solo_lone_ms > 0) == per_cpu, result
        assert (result.unverified is None) == (result.candidate.precision == "fp32")

    text = subprocess.run(
        [*HORNET, "tune", str(classifier_dir), "--seconds", "0.3", "--engines", "onnxruntime"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    lines = text.splitlines()
    fastest = next(i for i, line in enumerate(lines) if line.startswith("fastest"))
    command = lines[fastest + 1]
    words = shlex.split(command)
    assert words[:4] == ["hornet", "serve", "--model-dir", str(classifier_dir)]
    settings = load_settings(words[2:])
    assert lines[fastest].endswith(f", batches of up to {settings.max_batch_size}")
    chosen = Candidate(
        settings.engine,
        settings.precision,
        settings.instances,
        settings.engine_threads,
        settings.openvino_static_shapes,
    )
    table = {
        line.rsplit(maxsplit=5)[0]: line.rsplit(maxsplit=5)[1:3]
        for line in lines[1:]
        if line.startswith("onnxruntime ")
    }
    assert chosen.name in table
    assert float(table[chosen.name][0]) == max(float(rate) for rate, _ in table.values())
    assert int(table[chosen.name][1]) == settings.max_batch_size
    # The same choice as HORNET_* variables, read by `hornet serve` as the same settings.
    environment = lines[fastest + 2].split(": ", 1)[1].split()
    assert lines[fastest + 2].startswith("  or in the environment")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("HORNET_")]:
            patch.delenv(name)
        for assignment in environment:
            patch.setenv(*assignment.split("=", 1))
        from_env = load_settings([])
    assert {k: getattr(from_env, k) for k in chosen.values() if chosen.values()[k] is not None} == {
        k: v for k, v in chosen.values().items() if v is not None
    }
    assert from_env.max_batch_size == settings.max_batch_size
    # And as --model-setting for this model in a server of several: the same settings
    # for it, the server's own left as they are.
    per_model = lines[fastest + 3]
    assert per_model.startswith("  or for this model alone, in a server of several: ")
    served = load_settings(shlex.split(per_model.split(": ", 1)[1]))
    alone = served.for_model("tiny_cls")
    chosen_values = {k: v for k, v in chosen.values().items() if v is not None}
    assert {k: getattr(alone, k) for k in chosen_values} == chosen_values
    assert alone.max_batch_size == settings.max_batch_size
    assert served.max_batch_size == Settings().max_batch_size and served.instances == 1


def test_the_solo_engine_is_offered_where_it_answers_a_lone_request_sooner(tmp_path) -> None:
    per_cpu = Measured(
        Candidate("onnxruntime", "fp32", 2, 1), 20.0, 97.0, 300.0, solo_lone_ms=55.0,
        solo_memory_mib=140.0,
    )  # fmt: skip
    wide = Measured(Candidate("onnxruntime", "fp32", 1, 2), 16.0, 54.0, 200.0)
    text = report([per_cpu, wide], tmp_path, wide.candidate)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  with --solo-engine"))
    assert "55.0 ms instead of 97.0" in lines[at] and "140 MiB" in lines[at]
    words = shlex.split(lines[at + 1])
    assert words[:2] == ["hornet", "serve"] and words[-1] == "--solo-engine"
    settings = load_settings(words[2:])  # serve takes it: two one-thread instances + solo
    assert (settings.instances, settings.engine_threads, settings.solo_engine) == (2, 1, True)
    # The solo engine is as quick as the quickest lone request: no second recommendation.
    assert "quickest for a lone request" not in text
    # Where it would not help (slower than the instance alone), it is not offered.
    per_cpu.solo_lone_ms = 120.0
    text = report([per_cpu, wide], tmp_path, wide.candidate)
    assert "--solo-engine" not in text and "quickest for a lone request" in text


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_segmenters_and_detectors_are_tuned_too_on_the_users_image(task, photos, tmp_path) -> None:
    image = tmp_path / "coffee.jpg"
    image.write_bytes(encode(photos["coffee"], "JPEG"))
    done = subprocess.run(
        [*HORNET, "tune", str(demo.bundle_dir(task)), "--seconds", "0.2", "--json",
         "--engines", "onnxruntime", "--image", str(image), "--rounds", "2"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    found = candidates(load_bundle(demo.bundle_dir(task)), _cpus(done), openvino=False)
    assert [Candidate(**row["candidate"]) for row in rows] == found
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in rows)
    assert done.stderr.count("round 2:") == len(rows)
    # A detector runs one image per call: no batch size recommended for it.
    assert all((r["batch_size"] == 0) == (task == "detect") for r in rows), rows


def test_candidates_run_on_the_cpu_whatever_the_images_environment_says(tmp_path) -> None:
    """The images set HORNET_* variables for `hornet serve` (the GPU one HORNET_DEVICE=cuda
    and HORNET_ENGINE=tensorrt); `hornet tune` run there still measures its CPU candidates
    (with the device from the environment, each failed: 'runs on the CPU, not cuda')."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HORNET_")}
    environment |= {
        "HORNET_DEVICE": "cuda",
        "HORNET_ENGINE": "tensorrt",
        "HORNET_PRECISION": "fp16",
        "HORNET_MODEL_DIR": str(tmp_path / "not-there"),
    }
    done = subprocess.run(
        [*HORNET, "tune", str(demo.bundle_dir("classify")), "--seconds", "0.2", "--json",
         "--engines", "onnxruntime"],
        capture_output=True, text=True, timeout=600, check=True, env=environment,
    )  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows and all(r["error"] is None and r["images_per_s"] > 0 for r in rows), rows


def _cpus(done: subprocess.CompletedProcess) -> int:
    """The CPU count `hornet tune` reported on its first line."""
    return int(done.stderr.split(" CPUs")[0].rsplit(" ", 1)[1])


@pytest.mark.parametrize("static", [False, True])
def test_printed_settings_say_static_shapes_either_way_for_openvino(static, monkeypatch) -> None:
    """An environment that already turns static shapes on (the OpenVINO overlay's) must
    not turn a candidate measured without them into one with them."""
    candidate = Candidate("openvino", "bf16", 2, 1, static)
    monkeypatch.setenv("HORNET_OPENVINO_STATIC_SHAPES", "true" if not static else "false")
    assert load_settings(candidate.flags()).openvino_static_shapes is static
    for name, value in candidate.environment().items():
        monkeypatch.setenv(name, value)
    assert load_settings([]).openvino_static_shapes is static


def test_the_recommended_batch_is_the_smallest_as_fast_as_the_fastest() -> None:
    """Measured on the AMX Xeon, ONNX Runtime fp32 2 x 1: batches of 2 beat 8 by a
    fifth; OpenVINO bf16: 4 within 2% of 8. A single size is its own recommendation."""
    assert batch_sizes(8) == [1, 2, 4, 8] and batch_sizes(6) == [1, 2, 4, 6]
    assert batch_sizes(1) == [1] and batch_sizes(16) == [1, 2, 4, 8, 16]
    assert at_recommended_batch({1: 28.7, 2: 31.0, 4: 28.4, 8: 25.1}) == (2, 31.0)
    assert at_recommended_batch({1: 90.7, 2: 106.8, 4: 110.6, 8: 111.9}) == (4, 110.6)
    assert at_recommended_batch({1: 90.7, 2: 106.8, 4: 105.0, 8: 111.9}) == (8, 111.9)
    assert at_recommended_batch({1: 12.0}) == (1, 12.0)


def test_the_recommended_command_carries_the_batch_size(tmp_path) -> None:
    chosen = Measured(
        Candidate("onnxruntime", "fp32", 2, 1), 31.0, batch_size=2,
        by_batch={1: 28.7, 2: 31.0, 4: 28.4, 8: 25.1}, lone_ms=60.0,
    )  # fmt: skip
    text = report([chosen], tmp_path, chosen.candidate)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("fastest"))
    settings = load_settings(shlex.split(lines[at + 1])[2:])
    assert (settings.instances, settings.engine_threads, settings.max_batch_size) == (2, 1, 2)
    assert "HORNET_MAX_BATCH_SIZE=2" in lines[at + 2].split()
    assert lines[at + 3].startswith("  or for this model alone, in a server of several: ")
    assert lines[at + 4].startswith("  its images/s by batch size: 1=28.7  2=31.0  4=28.4  8=25.1")
    # A detector's row (batch size 0): no batch flag, no batch line.
    chosen.batch_size, chosen.by_batch = 0, {1: 31.0}
    text = report([chosen], tmp_path, chosen.candidate)
    assert "max-batch-size" not in text and "MAX_BATCH_SIZE" not in text
    assert "by batch size" not in text


def test_several_bundles_are_tuned_in_turn_into_one_command_serving_them_all(
    classifier_dir, tmp_path
) -> None:
    """`hornet tune A B`: each bundle's report, then one command serving both with each
    one's pick as --model-setting; that command, run, serves each model as its own
    report recommended (read back from /v1/models)."""
    segmenter = demo.bundle_dir("segment")
    done = subprocess.run(
        [*HORNET, "tune", str(classifier_dir), str(segmenter), "--seconds", "0.2",
         "--engines", "onnxruntime"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    alone = {}  # each report's recommended command, parsed by `hornet serve`'s parser
    for index, line in enumerate(lines):
        if line.startswith("fastest"):
            words = shlex.split(lines[index + 1])
            alone[load_bundle(Path(words[3])).name] = load_settings(words[4:])
    assert set(alone) == {"tiny_cls", "shapes_segment"}
    at = next(i for i, line in enumerate(lines) if line.startswith("all of them in one server"))
    words = shlex.split(lines[at + 1])
    assert words[:2] == ["hornet", "serve"]
    together = load_settings(words[2:])
    assert together.models_with_settings() == ["tiny_cls", "shapes_segment"]
    for name, settings in alone.items():
        own = together.for_model(name)
        for field in ("engine", "precision", "instances", "engine_threads", "max_batch_size"):
            assert getattr(own, field) == getattr(settings, field), (name, field)
    environment = lines[at + 2].split("HORNET_MODEL_SETTINGS=", 1)[1]
    assert Settings(model_settings=shlex.split(environment)[0]).model_settings == (
        together.model_settings
    )
    with (
        running_server(words[2:], log_path=tmp_path / "server.log", inherit_settings=False) as s,
        httpx.Client(base_url=s.url, timeout=30) as http,
    ):
        served = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    for name, settings in alone.items():
        batching = served[name]["batching"]
        assert batching["instances"] == settings.instances, name
        assert batching["max_batch_size"] == settings.max_batch_size, name


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--seconds", "0"], "argument --seconds: '0': seconds of load, above 0 and finite"),
        (["--seconds", "inf"], "argument --seconds: 'inf': seconds of load"),  # ran forever
        (["--rounds", "0"], "argument --rounds: '0': a whole number, at least 1"),  # IndexError
        (["--engines", "onnxruntime,tensorrt"], "'tensorrt': the engines measured are"),
    ],
)
def test_hornet_tune_refuses_arguments_it_cannot_measure_with(capsys, flags, said) -> None:
    """Before: --seconds 0 recommended flags from no load at all, --seconds inf measured
    without end, --rounds 0 ended in IndexError, an unknown engine gave "no verified
    candidate ran here"."""
    from hornet_cli import subcommand_parsers

    with pytest.raises(SystemExit) as exited:
        subcommand_parsers()["tune"].parse_args([str(demo.bundle_dir("classify")), *flags])
    assert exited.value.code == 2 and said in capsys.readouterr().err


def test_hornet_tune_refuses_an_image_it_could_not_serve_before_measuring(tmp_path) -> None:
    """Before, each candidate reported "cannot run here: UnsupportedMediaType", and the
    command ended "no verified candidate ran here"."""
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    bundle = str(demo.bundle_dir("classify"))
    done = subprocess.run(
        [*HORNET, "tune", bundle, "--image", str(text)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"hornet tune: --image {text}: not a recognised image; send JPEG, PNG, WebP, BMP, "
        "TIFF or GIF"
    ]
