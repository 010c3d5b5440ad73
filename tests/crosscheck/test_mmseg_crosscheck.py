"""Segmentation cross-checked against mmseg itself (issue P10, item 4).

mmseg_reference.py builds each official UperNet config (mmseg_configs.py, at tiny widths)
with mmseg 0.30's own code in the OpenMMLab environment, fills it with seeded weights,
saves an mmseg checkpoint and labels three photographs with mmseg's test pipeline and
slide inference. Here the same checkpoint is loaded strictly into our model and the
photographs are labelled twice: by our torch model (the mmseg test pipeline as the spec
writes it: OpenCV fit, normalise, slide 512/341, average, bilinear back, argmax) and by
our exported bundle served over HTTP by the service.

What "agree" means: the share of equal labels over the pixels mmseg classifies with a
top-1 softmax probability at least MARGIN above the top-2. Independent float32
implementations (FFT vs DFT-free graphs, op order, OpenCV builds) differ by ~1e-5 in
logits, so a pixel whose two best classes are closer than that may flip by rounding
alone; MARGIN keeps those out with a wide safety factor, and the confident share of the
pixels is asserted too so the check never becomes vacuous.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model_export import create_model
from tests.crosscheck.mm_env import run_in_mm_env
from tests.crosscheck.mmseg_configs import CONFIGS, CROP_SIZE, IMG_NORM_CFG, TINY_OVERRIDES

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
SEED = 7
MARGIN = 1e-3
AGREEMENT = 0.99
MIN_CONFIDENT_SHARE = 0.5
FIT_SCALE = (2048, 512)
STRIDE = 341
TRAINING_ONLY = "auxiliary_head."


@pytest.fixture(scope="module")
def reference(photos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mmseg's checkpoints and label maps: <out>/<config>/{mmseg.pth, <photo>.*.npy}."""
    out = tmp_path_factory.mktemp("mmseg")
    configs = ",".join(CONFIGS)
    script = HERE / "mmseg_reference.py"
    run_in_mm_env(script, str(out), str(SEED), configs, *map(str, photos.values()), timeout_s=900)
    return out


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _fit(height: int, width: int) -> tuple[int, int]:
    """mmcv.rescale_size: the largest size keeping the aspect ratio within FIT_SCALE."""
    factor = min(max(FIT_SCALE) / max(height, width), min(FIT_SCALE) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _windows(length: int, crop: int) -> list[tuple[int, int]]:
    """mmseg's slide windows along one axis: shifted back inside at the far border."""
    grids = max(length - crop + STRIDE - 1, 0) // STRIDE + 1
    spans = []
    for i in range(grids):
        end = min(i * STRIDE + crop, length)
        spans.append((max(end - crop, 0), end))
    return spans


def torch_labels(model: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    """The mmseg test pipeline and slide inference, written from the spec, on our model."""
    height, width = _fit(*rgb.shape[:2])
    resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    mean = torch.tensor(IMG_NORM_CFG["mean"]).view(3, 1, 1)
    std = torch.tensor(IMG_NORM_CFG["std"]).view(3, 1, 1)
    image = (torch.from_numpy(resized).permute(2, 0, 1).float() - mean) / std
    summed = torch.zeros(model.num_classes, height, width)
    count = torch.zeros(height, width)
    with torch.no_grad():
        for y1, y2 in _windows(height, CROP_SIZE[0]):
            for x1, x2 in _windows(width, CROP_SIZE[1]):
                summed[:, y1:y2, x1:x2] += model(image[None, :, y1:y2, x1:x2])[0]
                count[y1:y2, x1:x2] += 1
    logits = F.interpolate(
        (summed / count)[None], size=rgb.shape[:2], mode="bilinear", align_corners=False
    )
    return logits[0].argmax(0).numpy()


def agreement(reference: Path, photo: str, labels: np.ndarray) -> tuple[float, float]:
    """(agreement on confident pixels, confident share of all pixels)."""
    expected = np.load(reference / f"{photo}.labels.npy")
    confident = np.load(reference / f"{photo}.margin.npy") >= MARGIN
    assert labels.shape == expected.shape
    return float((labels == expected)[confident].mean()), float(confident.mean())


def _assert_agrees(reference: Path, results: dict[str, np.ndarray], what: str) -> None:
    figures = {photo: agreement(reference, photo, labels) for photo, labels in results.items()}
    report = ", ".join(f"{p}: {a:.5f} of {c:.3f}" for p, (a, c) in figures.items())
    print(f"{what} vs mmseg (agreement of the confident share): {report}")
    assert all(a >= AGREEMENT and c >= MIN_CONFIDENT_SHARE for a, c in figures.values()), (
        f"{what} vs mmseg (agreement of the confident share): {report}"
    )


def _load(name: str, checkpoint: Path | None = None) -> torch.nn.Module:
    return create_model(name, checkpoint=checkpoint, **TINY_OVERRIDES)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mmseg_checkpoint_loads_strictly(reference, name) -> None:
    checkpoint = reference / name / "mmseg.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    own = _load(name, checkpoint).state_dict()
    assert set(own) == {k for k in state if not k.startswith(TRAINING_ONLY)}
    assert any(k.startswith(TRAINING_ONLY) for k in state)
    key = "decode_head.conv_seg.weight"
    torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_model_labels_as_mmseg(reference, photos, name) -> None:
    model = _load(name, reference / name / "mmseg.pth")
    results = {photo: torch_labels(model, _rgb(path)) for photo, path in photos.items()}
    _assert_agrees(reference / name, results, f"{name} torch")


@pytest.fixture(scope="module")
def bundles(reference, tmp_path_factory) -> Path:
    """Each config exported by `model_export.export` from the mmseg checkpoint."""
    from model_export.export import ExportOptions, export

    out = tmp_path_factory.mktemp("bundles")
    for name in CONFIGS:
        options = ExportOptions(checkpoint=reference / name / "mmseg.pth", name=name)
        export(_load(name), out / name, options)
    return out


@pytest.fixture(scope="module")
def served_labels(bundles, photos) -> dict[str, dict[str, np.ndarray]]:
    """The bundles served by one in-process app; each photo POSTed to /segment as PNG."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(model_dir=[bundles / name for name in CONFIGS], engine_threads=2)
    labels: dict[str, dict[str, np.ndarray]] = {name: {} for name in CONFIGS}
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.1)
        for name, (photo, path) in itertools.product(CONFIGS, photos.items()):
            files = {"file": (path.name, path.read_bytes(), "image/png")}
            response = client.post("/segment", params={"model": name}, files=files)
            assert response.status_code == 200, response.text
            png = base64.b64decode(response.json()["results"][0]["mask_png"])
            labels[name][photo] = np.asarray(Image.open(io.BytesIO(png)))
    return labels


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bundle_resizes_with_opencv_as_mmseg(bundles, name) -> None:
    manifest = json.loads((bundles / name / "manifest.json").read_text())
    assert manifest["preprocess"]["resize_backend"] == "opencv"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_served_bundle_labels_as_mmseg(reference, served_labels, name) -> None:
    _assert_agrees(reference / name, served_labels[name], f"{name} served bundle")
