"""`--model-repository DIR`, as Triton's: a real server serves every bundle under the
directory (the subdirectories holding a manifest.json, in name order), skips and logs
the rest, adds them to --model-dir's, and refuses a repository without bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from service.settings import Settings
from service.testing import running_server


@pytest.fixture
def repository(classifier_dir, segmenter_dir, tmp_path: Path) -> Path:
    """Two bundles, and what a volume also holds: lost+found and a stray file; and a
    hidden entry, neither served nor reported."""
    root = tmp_path / "models"
    shutil.copytree(segmenter_dir, root / "b_segmenter")
    shutil.copytree(classifier_dir, root / "a_classifier")
    (root / "lost+found").mkdir()
    (root / "README.txt").write_text("not a bundle")
    # a hidden copy (an operator's, set aside): neither served nor reported
    shutil.copytree(classifier_dir, root / ".a_classifier.previous")
    return root


def test_a_server_serves_every_bundle_of_the_repository(repository, tmp_path: Path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    log = tmp_path / "server.log"
    flags = ["--model-repository", str(repository), "--engine-threads", "1"]
    with running_server(flags, log_path=log, inherit_settings=False) as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"]
        triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        index = triton.get_model_repository_index()  # Triton's client: an empty POST
        ready = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True})
        refused = httpx.post(f"{server.url}/v2/repository/index", json={"ready": "yes"})
        padded = {"ready": True, "padding": "x" * 5000}
        too_large = httpx.post(f"{server.url}/v2/repository/index", json=padded)
        triton.close()
    assert [m["name"] for m in models] == ["tiny_cls", "tiny_seg"]  # the directories' order
    assert index == [
        {"name": "tiny_cls", "version": "1", "state": "READY"},
        {"name": "tiny_seg", "version": "1", "state": "READY"},
    ]
    assert ready.json() == index
    assert refused.status_code == 422 and refused.json()["error"].startswith("invalid_parameters")
    assert too_large.status_code == 413
    assert not any(m["demo"] for m in models)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (skipped,) = [line for line in lines if line["message"].startswith("skipped entries")]
    assert sorted(Path(p).name for p in skipped["skipped"]) == ["README.txt", "lost+found"]
    assert not any("DEMO" in line["message"] for line in lines)


def test_model_dirs_and_repositories_add_up(repository, detector_dir, monkeypatch) -> None:
    settings = Settings(model_dir=[detector_dir], model_repository=[repository])
    assert settings.bundle_dirs == [
        detector_dir, repository / "a_classifier", repository / "b_segmenter"
    ]  # fmt: skip
    assert not settings.uses_demo_bundles
    monkeypatch.setenv("HORNET_MODEL_REPOSITORY", f"{repository},{repository}")
    monkeypatch.delenv("HORNET_MODEL_DIR", raising=False)
    from_env = Settings()
    assert from_env.model_repository == [repository, repository]
    assert len(from_env.bundle_dirs) == 4 and not from_env.uses_demo_bundles


def test_a_repository_that_is_no_directory_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        Settings(model_repository=[tmp_path / "missing"])


def test_a_repository_without_bundles_stops_the_server_with_status_2(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    (empty / "lost+found").mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repository", str(empty)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no bundles (subdirectories holding a manifest.json)" in done.stderr
    assert str(empty) in done.stderr


@pytest.mark.anyio
async def test_the_index_names_why_a_model_is_unavailable(classifier_dir, tmp_path) -> None:
    """A second bundle whose graph does not build: the index gives both bundles, the
    server not ready, each UNAVAILABLE with the loading error; none with ready only."""
    from tests.helpers.serving import serving

    broken = shutil.copytree(classifier_dir, tmp_path / "broken")
    graph = broken / "model.onnx"
    graph.write_bytes(b"not an onnx graph" + graph.read_bytes()[17:])
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["name"] = "broken_cls"
    from tests.helpers.bundles import sha256_bytes

    manifest["files"]["model.onnx"]["sha256"] = sha256_bytes(graph.read_bytes())
    (broken / "manifest.json").write_text(json.dumps(manifest))
    async with serving([classifier_dir, broken], wait_ready=False) as client:
        pool = client.app.state.pool
        for _ in range(400):
            if pool.load_error:
                break
            await anyio.sleep(0.01)
        index = (await client.post("/v2/repository/index")).json()
        ready_only = (await client.post("/v2/repository/index", json={"ready": True})).json()
    # the one that did not load by the name its manifest gives, as once served
    assert [(e["name"], e["state"]) for e in index] == [
        ("tiny_cls", "UNAVAILABLE"), ("broken_cls", "UNAVAILABLE")
    ]  # fmt: skip
    assert all(e["reason"] == pool.load_error for e in index) and pool.load_error
    assert ready_only == []
