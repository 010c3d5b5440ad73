"""The demo models judged over HTTP on the second renderer's images.

    python -m tests.demo.generalisation [--images 150] [--scenes 60] [--seed 0]

starts `hornet serve` with no model directory (the shipped demo bundles), uploads the
renderer's encoded images as a client would, and prints classification accuracy,
segmentation mean IoU (background and the three shapes) and, for detection, the recall at
box IoU 0.5 (right label, one detection per shape) and the share of detections scored
>= 0.5 that match no shape.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from service.testing import running_server
from tests.demo.second_renderer import LABELS, Drawn, render_scene, render_single

# Images per request: a few, so that a large image's segmentation tiles stay within the
# server's queue.
PER_REQUEST = 4
CONFIDENT = 0.5
MATCH_IOU = 0.5


@dataclass(frozen=True)
class Figures:
    accuracy: float
    mean_iou: float
    class_iou: dict[str, float]
    recall: float
    recall_confident: float
    false_share: float
    shapes: int
    confident_detections: int


def _post(client: httpx.Client, route: str, drawn: list[Drawn], params: dict) -> list[dict]:
    results = []
    for start in range(0, len(drawn), PER_REQUEST):
        files = [
            ("file", (f"image{i}", d.encoded, "application/octet-stream"))
            for i, d in enumerate(drawn[start : start + PER_REQUEST])
        ]
        response = client.post(route, params=params, files=files)
        response.raise_for_status()
        results += response.json()["results"]
    return results


def accuracy(client: httpx.Client, singles: list[Drawn]) -> float:
    results = _post(client, "/classify", singles, {"top_k": 1})
    right = [
        r["top_k"][0]["label"] == LABELS[d.labels[0]] for d, r in zip(singles, results, strict=True)
    ]
    return float(np.mean(right))


def class_ious(client: httpx.Client, scenes: list[Drawn]) -> np.ndarray:
    """IoU of background and each shape class over all the scenes' pixels."""
    intersection, union = np.zeros(len(LABELS) + 1), np.zeros(len(LABELS) + 1)
    for drawn, result in zip(scenes, _post(client, "/segment", scenes, {}), strict=True):
        guess = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask_png"]))))
        for k in range(len(LABELS) + 1):
            intersection[k] += ((drawn.class_mask == k) & (guess == k)).sum()
            union[k] += ((drawn.class_mask == k) | (guess == k)).sum()
    return intersection / union


def box_iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(drawn: Drawn, detections: list[dict]) -> tuple[int, int]:
    """(shapes found, detections matching no shape): detections by falling score each take
    the unclaimed shape of their label they overlap most, when that IoU reaches MATCH_IOU."""
    claimed = np.zeros(len(drawn.labels), dtype=bool)
    false = 0
    for detection in sorted(detections, key=lambda d: -d["score"]):
        overlaps = [
            box_iou(box, detection["box"])
            if LABELS[label] == detection["label"] and not taken
            else 0.0
            for label, box, taken in zip(drawn.labels, drawn.boxes, claimed, strict=True)
        ]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= MATCH_IOU:
            claimed[best] = True
        else:
            false += 1
    return int(claimed.sum()), false


def detection(client: httpx.Client, scenes: list[Drawn]) -> tuple[float, float, float, int]:
    """(recall of all detections served at score >= 0.05, recall and false share of those
    at >= CONFIDENT, how many of those there were)."""
    results = _post(client, "/detect", scenes, {"score_threshold": 0.05})
    found = found_confident = false = confident = 0
    for drawn, result in zip(scenes, results, strict=True):
        found += match(drawn, result["detections"])[0]
        sure = [d for d in result["detections"] if d["score"] >= CONFIDENT]
        hits, misses = match(drawn, sure)
        found_confident += hits
        false += misses
        confident += len(sure)
    shapes = sum(len(d.labels) for d in scenes)
    return found / shapes, found_confident / shapes, false / max(confident, 1), confident


def evaluate(base_url: str, images: int, scenes: int, seed: int) -> Figures:
    rng = np.random.default_rng(seed)
    singles = [render_single(rng) for _ in range(images)]
    drawn_scenes = [render_scene(rng) for _ in range(scenes)]
    with httpx.Client(base_url=base_url, timeout=120) as client:
        ious = class_ious(client, drawn_scenes)
        recall, recall_confident, false_share, confident = detection(client, drawn_scenes)
        return Figures(
            accuracy=accuracy(client, singles),
            mean_iou=float(ious.mean()),
            class_iou={
                name: round(float(v), 3)
                for name, v in zip(("background", *LABELS), ious, strict=True)
            },
            recall=recall,
            recall_confident=recall_confident,
            false_share=false_share,
            shapes=sum(len(d.labels) for d in drawn_scenes),
            confident_detections=confident,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=150, help="single-shape images")
    parser.add_argument("--scenes", type=int, default=60, help="scenes of 1-4 shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        help="serve this bundle instead of the demo ones (repeat: one of each task)",
    )
    args = parser.parse_args(argv)
    flags = [flag for path in args.model_dir for flag in ("--model-dir", path)]
    with running_server(flags) as server:
        figures = evaluate(server.url, args.images, args.scenes, args.seed)
    print(json.dumps(figures.__dict__ | {"images": args.images, "scenes": args.scenes}))


if __name__ == "__main__":
    main()
