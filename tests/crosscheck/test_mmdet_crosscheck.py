"""Detection cross-checked against mmdet itself (issue P10, item 4).

mmdet_reference.py builds each official detection config (mmdet_configs.py) with mmdet
2.28's own code in the OpenMMLab environment, with our HorNet backbone and HorFPN neck
registered under the official names, fills it with seeded weights, saves an mmdet
checkpoint and detects on three photographs with mmdet's test pipeline
(`inference_detector`). Here the same checkpoint is loaded strictly into our variant and
the photographs go through our torch model with mmdet's pipeline on the host
(model_export.mmdet_pipeline).

Substitution: mmcv is installed without its compiled ops, so mmdet's RoIAlign and NMS
kernels are torchvision's (mmcv_ext_detection.py; MMDET_FACTS.md measured them equal to
mmcv 1.7.2's CPU kernels). Everything around them is mmdet's.

Configurations: every configured architecture at tiny widths (the logic: cascade 7x7 and
GF, the 384-px GF filter sizes of HorNet-L, Mask R-CNN with FPN and both HorFPN necks),
and the real-size cascade with HorNet-T GF end to end.

Each checkpoint is also exported to a verified bundle (model_export.export, as `hornet
export --checkpoint` does) and served by a real server process; the photographs posted
to /detect (score threshold 0.05, mmdet's) must match mmdet's detections the same way:
the served path's host resize, graph, box rescaling and per-detection mask pasting
(service.pipelines.DetectPipeline) against mmdet's own.

"Match": every mmdet detection has one of ours with the same label, box IoU >= 0.99 (or,
for a box clipped to zero width or height, corners within 0.01 px) and score within
1e-3, except at the tail of a full list (scores within 1e-3 of the 100th, where rounding
may swap the 100th and 101st); none of ours above 0.3 is unmatched; the matched masks
agree on >= 99% of the pixels of the mmdet box (or differ in at most 2 of them: a box
of under 100 pixels).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torchvision.ops import box_iou

from model_export import create_model
from model_export.export import ExportOptions, export
from model_export.export.detect_mmdet import fitted_photographs
from model_export.export.options import ParityImages
from model_export.mmdet_pipeline import finish, prepare
from service.testing import running_server
from tests.crosscheck.mm_env import run_in_mm_env
from tests.crosscheck.mmdet_configs import TINY_OVERRIDES

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
SEED = 11
TINY = (
    "cascade_mask_rcnn_hornet_tiny_7x7",
    "cascade_mask_rcnn_hornet_tiny_gf",
    "cascade_mask_rcnn_hornet_large_gf",
    "mask_rcnn_hornet_small_7x7",
    "horfpn_7x7_mask_rcnn_hornet_small_7x7",
    "horfpn_gf_mask_rcnn_hornet_small_7x7",
)
FULL = "cascade_mask_rcnn_hornet_tiny_gf"
MIN_IOU = 0.99
DEGENERATE_TOLERANCE_PX = 0.01
SCORE_TOLERANCE = 1e-3
UNMATCHED_SCORE = 0.3
MASK_AGREEMENT = 0.99
# ...or at most this many pixels differ: the seeded tiny masks hover around 0.5 (a
# quarter of a 28x28 map within 0.01 of it), so ONNX Runtime's 1e-4-level differences
# flip a pixel here and there, and in a box under 100 pixels one pixel is over 1%.
MASK_SLACK_PIXELS = 2
MAX_PER_IMG = 100


@pytest.fixture(scope="module")
def reference(photos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mmdet's checkpoints and detections: <out>/<config>[-full]/{mmdet.pth, <photo>.npz}.

    HORNET_MMDET_REFERENCE=DIR keeps them in DIR and reuses them when its report.json
    exists (for working on our side without waiting for mmdet again)."""
    kept = os.environ.get("HORNET_MMDET_REFERENCE")
    if kept and (Path(kept) / "report.json").is_file():
        return Path(kept)
    out = Path(kept) if kept else tmp_path_factory.mktemp("mmdet")
    out.mkdir(parents=True, exist_ok=True)
    specs = ",".join([*TINY, f"{FULL}:full"])
    script = HERE / "mmdet_reference.py"
    run_in_mm_env(script, str(out), str(SEED), specs, *map(str, photos.values()), timeout_s=1800)
    return out


def detect(model: torch.nn.Module, photo: Path) -> dict[str, np.ndarray]:
    """Our torch model with mmdet's test pipeline on the host."""
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    prepared = prepare(rgb, model.pretrained_cfg.mean, model.pretrained_cfg.std)
    with torch.no_grad():
        (result,) = model(prepared.image, [prepared.image_shape])
    return finish(result, prepared)


def mismatches(ref: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> list[str]:
    """Every way `ours` fails to match `ref` (empty when they match)."""
    problems = []
    iou = box_iou(torch.from_numpy(ref["boxes"]), torch.from_numpy(ours["boxes"])).numpy()
    close = np.abs(ref["scores"][:, None] - ours["scores"][None, :]) <= SCORE_TOLERANCE
    # A box clipped to zero width or height at the border has no IoU: equal corners match.
    corners = np.abs(ref["boxes"][:, None, :] - ours["boxes"][None, :, :]).max(-1)
    same_box = (iou >= MIN_IOU) | (corners <= DEGENERATE_TOLERANCE_PX)
    ok = (ref["labels"][:, None] == ours["labels"][None, :]) & close & same_box
    full = len(ref["scores"]) == MAX_PER_IMG
    tail = ref["scores"][-1] + SCORE_TOLERANCE if full else -np.inf
    for i in np.flatnonzero(~ok.any(1)):
        if ref["scores"][i] > tail:
            problems.append(
                f"mmdet detection {i} (label {ref['labels'][i]}, score {ref['scores'][i]:.4f}, "
                f"box {ref['boxes'][i].round(1)}) has no match"
            )
    for j in np.flatnonzero(~ok.any(0) & (ours["scores"] > UNMATCHED_SCORE)):
        problems.append(f"our detection {j} (score {ours['scores'][j]:.4f}) is not mmdet's")
    for i in np.flatnonzero(ok.any(1)):
        j = np.flatnonzero(ok[i])[np.argmax(iou[i, ok[i]])]
        x0, y0 = np.floor(ref["boxes"][i, :2]).astype(int)
        x1, y1 = np.ceil(ref["boxes"][i, 2:]).astype(int)
        region = np.s_[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1]
        same = ref["masks"][i][region] == ours["masks"][j][region]
        agreement = same.mean()
        if agreement < MASK_AGREEMENT and (~same).sum() > MASK_SLACK_PIXELS:
            problems.append(f"mask of mmdet detection {i}: pixel agreement {agreement:.4f}")
    return problems


def _check_all(reference: Path, photos: dict[str, Path], name: str, folder: str, run) -> None:
    """`run(photo path)` answers as mmdet on every photograph."""
    seconds = {}
    for photo, path in photos.items():
        ref = dict(np.load(reference / folder / f"{photo}.npz"))
        start = time.perf_counter()
        ours = run(path)
        seconds[photo] = round(time.perf_counter() - start, 1)
        assert len(ref["scores"]) > 10, f"{name} on {photo}: mmdet found too few to compare"
        problems = mismatches(ref, ours)
        assert not problems, f"{name} on {photo}: " + "; ".join(problems[:10])
    print(f"{name} ({folder}): ours {seconds} s")


def _check(reference: Path, photos: dict[str, Path], name: str, folder: str, **overrides):
    model = create_model(name, checkpoint=reference / folder / "mmdet.pth", **overrides)
    _check_all(reference, photos, name, folder, lambda path: detect(model, path))


@pytest.fixture(scope="module")
def server(reference: Path, tmp_path_factory: pytest.TempPathFactory):
    """Every checkpoint exported to a verified bundle and served by one server process.
    Each export is checked against torch on the first photograph only (the default is
    four): the served answers are then held to mmdet's on all three."""
    out = tmp_path_factory.mktemp("bundles")
    fitted = fitted_photographs()
    first = ParityImages(fitted.images[:1], f"the first of {fitted.description}")
    dirs = []
    for name in TINY:
        checkpoint = reference / name / "mmdet.pth"
        model = create_model(name, checkpoint=checkpoint, **TINY_OVERRIDES)
        options = ExportOptions(checkpoint=checkpoint, name=f"{name}-tiny", parity_images=first)
        export(model, out / name, options)
        dirs.append(out / name)
    checkpoint = reference / f"{FULL}-full" / "mmdet.pth"
    manifest = export(FULL, out / "full", ExportOptions(checkpoint=checkpoint, parity_images=first))
    assert manifest.parity[0].passed and manifest.labels[0] == "person"
    dirs.append(out / "full")
    flags = [arg for d in dirs for arg in ("--model-dir", str(d))]
    flags += ["--engine-threads", "2", "--request-timeout-s", "600"]
    # Readiness waits for every model's warm-up run: the real-size cascade's takes a while.
    with running_server(flags, log_path=out / "server.log", ready_timeout_s=900) as running:
        yield running.url


def served(url: str, model: str, photo: Path) -> dict[str, np.ndarray]:
    """POST /detect's answer as mmdet's result arrays (full-size binary masks)."""
    response = httpx.post(
        f"{url}/detect",
        params={"model": model, "score_threshold": 0.05},
        content=photo.read_bytes(),
        headers={"Content-Type": "image/png"},
        timeout=600.0,
    )
    assert response.status_code == 200, response.text[:500]
    (result,) = response.json()["results"]
    detections = result["detections"]
    masks = [
        coco_mask.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
        for d in detections
    ]
    size = (result["height"], result["width"])
    return {
        "boxes": np.array([d["box"] for d in detections], np.float32).reshape(-1, 4),
        "scores": np.array([d["score"] for d in detections], np.float32),
        "labels": np.array([d["index"] for d in detections], np.int64),
        "masks": np.array(masks, bool).reshape(-1, *size),
    }


@pytest.mark.parametrize("name", TINY)
def test_served_tiny_bundle_detects_as_mmdet(reference, photos, server, name) -> None:
    _check_all(reference, photos, name, name, lambda path: served(server, f"{name}-tiny", path))


def test_served_real_size_tiny_gf_bundle_detects_as_mmdet(reference, photos, server) -> None:
    first = dict(list(photos.items())[:1])
    _check_all(reference, first, FULL, f"{FULL}-full", lambda path: served(server, FULL, path))


@pytest.mark.parametrize("name", TINY)
def test_tiny_detector_detects_as_mmdet(reference, photos, name) -> None:
    _check(reference, photos, name, name, **TINY_OVERRIDES)


def test_real_size_tiny_gf_cascade_detects_as_mmdet(reference, photos) -> None:
    first = dict(list(photos.items())[:1])  # the reference ran it on the first photo only
    _check(reference, first, FULL, f"{FULL}-full")


def test_mmdet_checkpoint_labels_come_from_its_meta(reference) -> None:
    """mmcv's save_checkpoint wrote meta CLASSES (mmdet's COCO names): they are the labels."""
    model = create_model(TINY[0], checkpoint=reference / TINY[0] / "mmdet.pth", **TINY_OVERRIDES)
    labels = model.pretrained_cfg.extra["labels"]
    assert len(labels) == 80 and labels[0] == "person" and labels[-1] == "toothbrush"
