"""Settings for one model only (`--model-setting MODEL:NAME=VALUE`, HORNET_MODEL_SETTINGS):
parsed and checked as the server's own flags are, refused at start for a model not served,
and, on a real server of two models, each model batching and running as its own settings
say while the other keeps the server's (read back from /v1/models, Triton's model
configuration and statistics, and the batches actually run)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.cli import load_settings
from service.settings import PER_MODEL_SETTINGS, Settings, parse_model_setting
from service.testing import running_server
from tests.helpers.images import encode, upload

MEMORY_CAP_BYTES = 4 << 30
TIMEOUT_S = 60


def test_a_setting_reads_model_name_and_value() -> None:
    assert parse_model_setting("det:max_batch_size=2") == ("det", "max_batch_size", "2")
    assert parse_model_setting(" det : max-delay-ms = 1.5 ") == ("det", "max_delay_ms", "1.5")
    # the model is what comes before the last colon
    assert parse_model_setting("a:b:instances=2") == ("a:b", "instances", "2")
    for text in ("det", "det:max_batch_size", "max_batch_size=2", ":max_batch_size=2", "d:x="):
        with pytest.raises(ValueError, match="MODEL:NAME=VALUE"):
            parse_model_setting(text)
    with pytest.raises(ValueError, match="'port' is not set per model; these are: engine"):
        parse_model_setting("det:port=80")


def test_flags_and_environment_give_the_same_settings(monkeypatch) -> None:
    flags = ["--model-setting", "det:max_batch_size=2", "--model-setting", "cls:engine=openvino"]
    monkeypatch.delenv("HORNET_MODEL_SETTINGS", raising=False)
    from_flags = load_settings(flags)
    monkeypatch.setenv("HORNET_MODEL_SETTINGS", "det:max_batch_size=2, cls:engine=openvino")
    from_environment = load_settings([])
    for settings in (from_flags, from_environment):
        assert settings.models_with_settings() == ["det", "cls"]
        assert settings.for_model("det").max_batch_size == 2
        assert settings.for_model("det").engine == "onnxruntime"
        assert settings.for_model("cls").engine == "openvino"
        assert settings.for_model("cls").max_batch_size == 8


def test_a_model_keeps_the_server_settings_it_is_not_given() -> None:
    server = Settings(max_delay_ms=7, instances=3, model_settings=["det:instances=1"])
    det = server.for_model("det")
    assert (det.instances, det.max_delay_ms, det.max_batch_size) == (1, 7.0, 8)
    assert det.model_settings == [] and det.models_with_settings() == []
    # what was given stays given (the demo bundles are served only when no model is)
    assert det.uses_demo_bundles == server.uses_demo_bundles
    assert server.for_model("other") is server
    assert server.instances == 3  # the server's own are untouched


@pytest.mark.parametrize(
    ("settings", "fact"),
    [
        (
            ["det:max_batch_size=0"],
            "model 'det' (--model-setting): max_batch_size: Input should "
            "be greater than or equal to 1",
        ),  # fmt: skip
        (["det:max_batch_size=two"], "max_batch_size: Input should be a valid integer"),
        (["det:engine=onnx"], "engine: Input should be 'onnxruntime', 'openvino'"),
        # checked beside the server's own settings, as the flags are
        (["det:precision=bf16"], "precision bf16 runs on --engine openvino only"),
        (["det:solo_engine=true"], "--solo-engine runs beside --instances 2 or more"),
        (["det:max_batch_size=2", "det:max-batch-size=3"], "'det' is given max_batch_size twice"),
        (["det:device=cuda"], "'device' is not set per model"),
    ],
)
def test_a_setting_that_cannot_be_served_is_refused_with_its_reason(settings, fact) -> None:
    with pytest.raises(ValueError, match="validation error") as refused:
        Settings(model_settings=settings)
    assert fact in str(refused.value)


def test_every_per_model_setting_is_a_server_setting() -> None:
    assert set(PER_MODEL_SETTINGS) <= set(Settings.model_fields)
    help_text = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--model-setting MODEL:NAME=VALUE" in help_text


def refused_at_start(*flags: str) -> str:
    """`python -m service *flags` exits with status 2 before serving: its stderr."""
    command = [sys.executable, "-m", "service", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    return result.stderr


def test_a_setting_for_a_model_not_served_stops_the_server_at_start(classifier_dir) -> None:
    """A typo in a model's name would otherwise leave that model on the server's settings
    without a word."""
    stderr = refused_at_start(
        "--model-dir", str(classifier_dir), "--model-setting", "tiny_cl:max_batch_size=2"
    )
    assert "--model-setting names 'tiny_cl', not served here (served: tiny_cls)" in stderr


def test_a_model_given_a_precision_it_was_not_verified_for_stops_the_server(
    classifier_dir, segmenter_dir
) -> None:
    """The precision gate reads each model's own settings: the segmenter asked for int8,
    which its bundle has no graph or record for, is refused by name; the classifier on
    the server's fp32 is not the one named."""
    stderr = refused_at_start(
        "--model-dir", str(classifier_dir), "--model-dir", str(segmenter_dir),
        "--model-setting", "tiny_seg:precision=int8",
    )  # fmt: skip
    assert "bundle 'tiny_seg'" in stderr and "no passed parity record for int8" in stderr
    assert "tiny_cls" not in stderr.split("hornet serve:", 1)[1]


@pytest.fixture(scope="module")
def server(classifier_dir, segmenter_dir, tmp_path_factory):
    """The classifier on OpenVINO batching one image at a time, the segmenter on the
    server's ONNX Runtime with two instances; every batch otherwise waits 300 ms for up to
    4 items, so that concurrent requests share batches unless a model's settings say not."""
    log = tmp_path_factory.mktemp("model_settings") / "server.log"
    flags = ["--model-dir", str(classifier_dir), "--model-dir", str(segmenter_dir),
             "--engine-threads", "1", "--max-batch-size", "4", "--max-delay-ms", "300",
             "--no-close-batches-early",
             "--model-setting", "tiny_cls:max_batch_size=1",
             "--model-setting", "tiny_cls:engine=openvino",
             "--model-setting", "tiny_seg:instances=2"]  # fmt: skip
    with (
        running_server(
            flags, log_path=log, inherit_settings=False, memory_limit_bytes=MEMORY_CAP_BYTES
        ) as running,
        httpx.Client(base_url=running.url, timeout=TIMEOUT_S) as http,
    ):
        yield http


def test_each_model_reports_its_own_settings(server) -> None:
    http = server
    models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    cls, seg = models["tiny_cls"], models["tiny_seg"]
    assert cls["engine"].startswith("openvino") and seg["engine"].startswith("onnxruntime")
    assert cls["batching"]["max_batch_size"] == 1 and cls["batching"]["instances"] == 1
    assert seg["batching"]["max_batch_size"] == 4 and seg["batching"]["instances"] == 2
    assert cls["batching"]["max_delay_ms"] == seg["batching"]["max_delay_ms"] == 300
    configs = {name: http.get(f"/v2/models/{name}/config").json() for name in models}
    assert configs["tiny_cls"]["platform"] == "openvino"
    assert configs["tiny_cls"]["max_batch_size"] == 1
    assert configs["tiny_seg"]["platform"] == "onnxruntime_onnx"
    assert configs["tiny_seg"]["max_batch_size"] == 4
    assert configs["tiny_seg"]["instance_group"][0]["count"] == 2
    metadata = http.get("/v2/models/tiny_cls").json()
    assert metadata["platform"] == "openvino"


def test_each_model_batches_as_its_settings_say(server, photos) -> None:
    """Four concurrent requests to each model: the classifier (max batch 1) runs four
    batches of one image; the segmenter, on the server's max batch of 4 and 300 ms, runs
    its tiles in batches of up to 4, some of them more than one."""
    http = server
    jpeg = encode(photos["chelsea"], "JPEG")

    def post(route: str) -> int:
        return http.post(route, files=upload(jpeg, content_type="image/jpeg")).status_code

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, ["/classify"] * 4 + ["/segment"] * 4))
    assert answers == [200] * 8
    stats = {s["name"]: s for s in http.get("/v2/models/stats").json()["model_stats"]}
    cls_sizes = {
        b["batch_size"]: b["compute_infer"]["count"] for b in stats["tiny_cls"]["batch_stats"]
    }
    assert cls_sizes == {1: 4}
    seg_sizes = {b["batch_size"] for b in stats["tiny_seg"]["batch_stats"]}
    assert max(seg_sizes) > 1 and max(seg_sizes) <= 4, seg_sizes
