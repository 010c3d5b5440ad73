"""The shapes generator: exact masks and boxes, seeded determinism, any image size."""

from __future__ import annotations

import numpy as np
import pytest

from model_export.demo.shapes import (
    CLASS_NAMES,
    SEGMENT_LABELS,
    generate_sample,
    generate_sample_scene,
    generate_scene,
    mask_box,
)

SIZES = [(64, 64), (97, 153), (240, 75), (31, 47)]


def _scenes(count: int = 20, seed: int = 0, size=(120, 160)):
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, *size) for _ in range(count)]


def test_label_names_are_the_demo_contract() -> None:
    assert CLASS_NAMES == ("circle", "square", "triangle")
    assert SEGMENT_LABELS == ("background", "circle", "square", "triangle")


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_scene_has_the_requested_size_and_dtypes(height: int, width: int) -> None:
    scene = generate_scene(np.random.default_rng(3), height, width)
    assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
    assert scene.class_mask.shape == (height, width) and scene.class_mask.dtype == np.uint8
    n = len(scene.labels)
    assert scene.masks.shape == (n, height, width) and scene.masks.dtype == bool
    assert scene.boxes.shape == (n, 4) and scene.boxes.dtype == np.float32
    assert scene.labels.dtype == np.int64


def test_every_scene_holds_at_least_one_shape() -> None:
    assert all(len(scene.labels) >= 1 for scene in _scenes(30))


def test_instance_pixels_all_have_the_instance_colour() -> None:
    for scene in _scenes():
        for mask in scene.masks:
            colours = np.unique(scene.image[mask], axis=0)
            assert len(colours) == 1


def test_class_mask_is_the_union_of_instance_masks_by_label() -> None:
    for scene in _scenes():
        expected = np.zeros_like(scene.class_mask)
        for label, mask in zip(scene.labels, scene.masks, strict=True):
            expected[mask] = label + 1
        np.testing.assert_array_equal(scene.class_mask, expected)


def test_instance_masks_are_disjoint_visible_parts() -> None:
    for scene in _scenes():
        assert (scene.masks.sum(axis=0) <= 1).all()
        assert all(mask.any() for mask in scene.masks)


def test_background_pixels_differ_from_the_touching_shape_colour() -> None:
    """The mask's edge is the colour edge: just outside a shape the colour changes."""
    for scene in _scenes():
        for mask in scene.masks:
            colour = scene.image[mask][0]
            grown = mask.copy()
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            ring = grown & ~mask
            if ring.any():
                assert not (scene.image[ring] == colour).all(axis=1).all()


def test_boxes_are_tight_around_instance_masks() -> None:
    for scene in _scenes():
        for box, mask in zip(scene.boxes, scene.masks, strict=True):
            x1, y1, x2, y2 = (int(v) for v in box)
            assert mask[y1:y2, x1:x2].sum() == mask.sum()
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()


def test_mask_box_uses_pixel_edges() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:8] = True
    assert mask_box(mask) == (3.0, 2.0, 8.0, 5.0)


def test_all_three_classes_appear() -> None:
    labels = np.concatenate([scene.labels for scene in _scenes(30)])
    assert set(labels.tolist()) == {0, 1, 2}


def test_same_seed_same_scene() -> None:
    a = generate_scene(np.random.default_rng(42), 90, 110)
    b = generate_scene(np.random.default_rng(42), 90, 110)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_different_seeds_different_scenes() -> None:
    a = generate_scene(np.random.default_rng(1), 90, 110)
    b = generate_scene(np.random.default_rng(2), 90, 110)
    assert not np.array_equal(a.image, b.image)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_sample_is_one_shape_of_the_label(height: int, width: int) -> None:
    rng = np.random.default_rng(5)
    for _ in range(10):
        image, label = generate_sample(rng, height, width)
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert label in (0, 1, 2)


def test_sample_shape_lies_in_the_central_square() -> None:
    """A centre-cropping classifier sees the whole shape."""
    rng = np.random.default_rng(9)
    height, width = 80, 200
    for _ in range(20):
        scene = generate_sample_scene(rng, height, width)
        assert len(scene.labels) == 1
        x1, y1, x2, y2 = scene.boxes[0]
        assert (width - height) / 2 <= x1 and x2 <= (width + height) / 2
        assert 0 <= y1 and y2 <= height


def test_cli_writes_the_seeded_scene_and_its_truth(tmp_path, capsys) -> None:
    import json

    from PIL import Image

    from model_export.demo.shapes import main

    out = tmp_path / "scene.png"
    main([str(out), "--size", "150x110", "--seed", "3"])
    truth = json.loads(capsys.readouterr().out)
    scene = generate_scene(np.random.default_rng(3), 110, 150)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), scene.image)
    assert [s["label"] for s in truth["shapes"]] == [CLASS_NAMES[i] for i in scene.labels]
    np.testing.assert_allclose([s["box"] for s in truth["shapes"]], scene.boxes, atol=0.05)

    main([str(out), "--size", "64x64", "--seed", "4", "--single"])
    truth = json.loads(capsys.readouterr().out)
    image, label = generate_sample(np.random.default_rng(4), 64, 64)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), image)
    assert [s["label"] for s in truth["shapes"]] == [CLASS_NAMES[label]]


def test_cli_refuses_a_malformed_size(tmp_path) -> None:
    from model_export.demo.shapes import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "x.png"), "--size", "big"])
    assert exit_info.value.code == 2
