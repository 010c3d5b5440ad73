"""The second renderer: its truth is consistent, it is seeded, and it stands apart from
the training generator."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.demo import second_renderer
from tests.demo.second_renderer import LABELS, MAX_ASPECT, render_scene, render_single


def _drawn(count: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [render_scene(rng) for _ in range(count)] + [render_single(rng) for _ in range(count)]


def test_it_imports_nothing_of_the_training_code() -> None:
    tree = ast.parse(Path(second_renderer.__file__).read_text())
    modules = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [m for m in modules if m and m.startswith("model_export")]


def test_images_decode_at_the_truth_size_within_the_aspect_limit() -> None:
    for drawn in _drawn():
        image = Image.open(io.BytesIO(drawn.encoded))
        assert image.size[::-1] == drawn.class_mask.shape
        assert max(image.size) / min(image.size) <= MAX_ASPECT + 0.05


def test_class_mask_boxes_and_masks_agree() -> None:
    for drawn in _drawn():
        assert len(drawn.labels) == len(drawn.masks) == len(drawn.boxes) >= 1
        assert (drawn.masks.sum(axis=0) <= 1).all()
        for label, mask, box in zip(drawn.labels, drawn.masks, drawn.boxes, strict=True):
            assert (drawn.class_mask[mask] == label + 1).all()
            x1, y1, x2, y2 = (int(v) for v in box)
            assert mask[y1:y2, x1:x2].sum() == mask.sum()
        assert (drawn.class_mask > 0).sum() == drawn.masks.sum()


def test_single_images_hold_one_shape_and_every_class_appears() -> None:
    rng = np.random.default_rng(1)
    singles = [render_single(rng) for _ in range(30)]
    assert all(len(d.labels) == 1 for d in singles)
    assert {int(d.labels[0]) for d in singles} == set(range(len(LABELS)))


def test_same_seed_same_images() -> None:
    a, b = _drawn(3, seed=5), _drawn(3, seed=5)
    assert [d.encoded for d in a] == [d.encoded for d in b]
