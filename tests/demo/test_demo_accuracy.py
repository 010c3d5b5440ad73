"""The shipped demo models answer correctly through the real HTTP path.

Fresh images (seeds never used in training, several image sizes) go through the
service app (upload, decode, preprocessing, batching, ONNX Runtime, answer shaping) and
the answers are scored against the generator's exact ground truth.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from hornet_bundle import MANIFEST_NAME, Manifest
from model_export.demo.shapes import (
    CLASS_NAMES,
    SEGMENT_LABELS,
    generate_sample,
    generate_scene,
)
from tests.helpers.demo import bundle_dir, serving_demo, uploads

pytestmark = pytest.mark.anyio

SIZES = [(64, 64), (150, 110), (96, 240), (300, 200)]
TEST_SEED = 900_000
BATCH = 16
SCENES_PER_REQUEST = 2


def _manifest(task: str) -> Manifest:
    return Manifest.model_validate_json((bundle_dir(task) / MANIFEST_NAME).read_text())


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_demo_bundle_ships_with_shapes_labels_and_demo_flag(task: str) -> None:
    manifest = _manifest(task)
    assert manifest.demo and manifest.task == task
    assert not manifest.weights.random
    expected = SEGMENT_LABELS if task == "segment" else CLASS_NAMES
    assert manifest.labels == list(expected)
    training = manifest.export["demo_training"]
    assert training["command"].startswith("python -m model_export.demo.train")
    assert {"data_seed", "torch_seed", "steps"} <= training.keys()


@pytest.mark.parametrize("task", ["classify", "segment", "detect"])
def test_demo_bundle_is_small(task: str) -> None:
    assert sum(entry.bytes for entry in _manifest(task).files.values()) < 5_000_000


async def _post(client, route: str, scenes: list) -> list[dict]:
    """The route's results for the scenes' images, a few images per request (a large
    image is many segmentation tiles, and the queue is bounded)."""
    results = []
    for start in range(0, len(scenes), SCENES_PER_REQUEST):
        chunk = scenes[start : start + SCENES_PER_REQUEST]
        response = await client.post(route, files=uploads([s.image for s in chunk]))
        assert response.status_code == 200, response.text
        results += response.json()["results"]
    return results


def _decode_mask(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


async def test_classifier_accuracy_over_http_is_at_least_95_percent() -> None:
    rng = np.random.default_rng(TEST_SEED)
    correct = total = 0
    async with serving_demo("classify") as client:
        for height, width in SIZES:
            samples = [generate_sample(rng, height, width) for _ in range(30)]
            for start in range(0, len(samples), BATCH):
                chunk = samples[start : start + BATCH]
                response = await client.post(
                    "/classify", params={"top_k": 1}, files=uploads([s[0] for s in chunk])
                )
                assert response.status_code == 200, response.text
                for (_, label), result in zip(chunk, response.json()["results"], strict=True):
                    correct += result["top_k"][0]["label"] == CLASS_NAMES[label]
                    total += 1
    accuracy = correct / total
    print(f"classification accuracy {accuracy:.3f} on {total} images")
    assert accuracy >= 0.95


async def test_segmenter_mean_iou_over_http_is_at_least_0_9() -> None:
    rng = np.random.default_rng(TEST_SEED + 1)
    classes = len(SEGMENT_LABELS)
    intersection = np.zeros(classes)
    union = np.zeros(classes)
    async with serving_demo("segment") as client:
        for height, width in SIZES:
            scenes = [generate_scene(rng, height, width) for _ in range(8)]
            for scene, result in zip(scenes, await _post(client, "/segment", scenes), strict=True):
                predicted = _decode_mask(result["mask_png"])
                assert predicted.shape == (height, width)
                for k in range(classes):
                    truth, guess = scene.class_mask == k, predicted == k
                    intersection[k] += (truth & guess).sum()
                    union[k] += (truth | guess).sum()
    iou = intersection / union
    print("segmentation IoU per class", dict(zip(SEGMENT_LABELS, iou.round(3), strict=True)))
    assert iou.mean() >= 0.9


async def test_detector_finds_80_percent_of_shapes_over_http() -> None:
    rng = np.random.default_rng(TEST_SEED + 2)
    found = total = detections = 0
    async with serving_demo("detect") as client:
        for height, width in SIZES:
            scenes = [generate_scene(rng, height, width) for _ in range(8)]
            for scene, result in zip(scenes, await _post(client, "/detect", scenes), strict=True):
                found += _matched(scene, result["detections"])
                total += len(scene.labels)
                detections += len(result["detections"])
    recall = found / total
    print(f"detection: {found}/{total} shapes found (recall {recall:.3f}), {detections} detections")
    assert recall >= 0.8


def _matched(scene, detections: list[dict]) -> int:
    """Shapes paired one to one with a detection of the right label and box IoU >= 0.5."""
    unused = list(detections)
    count = 0
    for label, box in zip(scene.labels, scene.boxes, strict=True):
        scored = [
            (_box_iou(box, np.array(d["box"])), i)
            for i, d in enumerate(unused)
            if d["label"] == CLASS_NAMES[label]
        ]
        best = max(scored, default=(0.0, -1))
        if best[0] >= 0.5:
            count += 1
            unused.pop(best[1])
    return count


async def test_detector_masks_are_at_image_size() -> None:
    scene = generate_scene(np.random.default_rng(TEST_SEED + 3), 130, 170, num_shapes=(2, 2))
    async with serving_demo("detect") as client:
        response = await client.post("/detect", files=uploads([scene.image]))
    detections = response.json()["results"][0]["detections"]
    assert detections
    for detection in detections:
        rle = detection["mask"]
        assert tuple(rle["size"]) == (130, 170)
        decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert decoded.shape == (130, 170)


async def test_models_route_says_the_demo_models_are_demo() -> None:
    async with serving_demo("classify", "segment", "detect") as client:
        models = (await client.get("/v1/models")).json()["models"]
    assert {m["name"]: m["demo"] for m in models} == {
        "shapes_classify": True,
        "shapes_segment": True,
        "shapes_detect": True,
    }
