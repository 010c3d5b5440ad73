"""The demo training data is what the served graphs see: the service's own preprocessing."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from PIL import Image

from hornet_bundle import Preprocess
from hornet_bundle.preprocess import classification_input
from model_export.demo import training
from model_export.demo.appearance import random_size, repaint
from model_export.demo.data import (
    MAX_ASPECT,
    SCENE_RADIUS,
    TRAIN_SIDES,
    classification_pool,
    detection_sample,
    segmentation_tile,
    training_scene,
)
from model_export.demo.models import (
    build_classifier,
    build_detector,
    build_segmenter,
    transfer_trunk,
)
from model_export.demo.recipes import SEGMENT
from model_export.demo.shapes import generate_scene


def _preprocess(model) -> Preprocess:
    return Preprocess(**model.pretrained_cfg.preprocess())


def test_segmentation_tiles_are_the_graph_input_size_with_aligned_targets() -> None:
    preprocess = _preprocess(build_segmenter())
    rng = np.random.default_rng(0)
    for _ in range(10):
        tile, target = segmentation_tile(rng, preprocess)
        assert tile.shape == (*preprocess.input_size, 3) and tile.dtype == np.uint8
        assert target.shape == preprocess.input_size
        assert set(np.unique(target)) <= {0, 1, 2, 3, 255}
        padding = target == 255
        assert (tile[padding] == 0).all()


def test_segmenter_windows_are_its_tiles_at_the_recipes_stride() -> None:
    tile = SEGMENT.overrides["image_size"]
    for stride, expected in ((None, tile * 2 // 3), (tile // 4, tile // 4)):
        window = _preprocess(
            build_segmenter(dataclasses.replace(SEGMENT, stride=stride))
        ).sliding_window
        assert window.crop == (tile, tile) and window.stride == (expected, expected)


def test_classification_pool_is_the_service_crop_with_its_class_masks() -> None:
    preprocess = _preprocess(build_classifier())
    crops, labels, masks = classification_pool(np.random.default_rng(1), preprocess, 6)
    assert crops.shape == (6, *preprocess.input_size, 3) and crops.dtype == np.uint8
    assert masks.shape == (6, *preprocess.input_size) and masks.dtype == np.uint8
    # Replayed from the same seed: each sample is a training scene through the service's
    # classification preprocessing, its class mask resized the same way (nearest).
    rng = np.random.default_rng(1)
    for crop, label, mask in zip(crops, labels, masks, strict=True):
        scene = training_scene(rng, single=True)
        assert label == scene.labels[0]
        expected = classification_input(Image.fromarray(scene.image), preprocess)
        assert np.array_equal(crop, expected)
        assert set(np.unique(mask)) <= {0, label + 1}
        resized = Image.fromarray(scene.class_mask).resize(
            mask.shape[::-1], Image.Resampling.NEAREST
        )
        assert np.array_equal(mask, np.asarray(resized))


def test_detection_targets_follow_torchvision_conventions() -> None:
    image, target = detection_sample(np.random.default_rng(2))
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
    assert target["labels"].min() >= 1 and target["labels"].max() <= 3
    assert target["masks"].shape[1:] == image.shape[1:]
    assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])


def test_trunk_transfer_copies_the_shared_backbone() -> None:
    torch.manual_seed(0)
    segmenter = build_segmenter()
    detector = build_detector()
    copied = transfer_trunk(segmenter.backbone, detector.backbone.backbone)
    assert "stages.0.0.gnconv.dwconv.weight" in copied
    source = segmenter.backbone.state_dict()
    target = detector.backbone.backbone.state_dict()
    assert all(torch.equal(source[k], target[k]) for k in copied)


def test_classifier_sees_the_whole_image() -> None:
    """Resized whole ("direct"), never centre-cropped: a shape near an edge stays in."""
    preprocess = _preprocess(build_classifier())
    assert preprocess.resize_mode == "direct"


def test_repainting_keeps_the_geometry_and_changes_the_pixels() -> None:
    rng = np.random.default_rng(3)
    for _ in range(8):
        scene = generate_scene(rng, 90, 150)
        painted = repaint(rng, scene)
        assert painted.image.shape == scene.image.shape and painted.image.dtype == np.uint8
        assert painted.masks is scene.masks and painted.boxes is scene.boxes
        assert not np.array_equal(painted.image, scene.image)


def test_training_images_stay_within_the_aspect_limit() -> None:
    rng = np.random.default_rng(4)
    for single in (True, False):
        for _ in range(10):
            scene = training_scene(rng, single=single)
            height, width = scene.class_mask.shape
            assert max(height, width) / min(height, width) <= MAX_ASPECT + 0.05
            assert len(scene.labels) == 1 if single else len(scene.labels) >= 1


def test_classification_shapes_may_lie_anywhere() -> None:
    """Some shapes lie outside the central square that a centre crop would keep."""
    rng = np.random.default_rng(5)
    outside = 0
    for _ in range(40):
        scene = training_scene(rng, single=True)
        height, width = scene.class_mask.shape
        x1, y1, x2, y2 = scene.boxes[0]
        short = min(height, width)
        left, top = (width - short) / 2, (height - short) / 2
        outside += x1 < left or y1 < top or x2 > left + short or y2 > top + short
    assert outside >= 5


def test_plain_share_leaves_that_share_of_scenes_as_the_generator_drew_them() -> None:
    rng = np.random.default_rng(6)
    plain = []
    for _ in range(120):
        probe = copy.deepcopy(rng)
        size = random_size(probe, TRAIN_SIDES, MAX_ASPECT)
        generated = generate_scene(probe, *size, radius_range=SCENE_RADIUS)
        scene = training_scene(rng, plain_share=0.25)
        plain.append(np.array_equal(scene.image, generated.image))
        assert np.array_equal(scene.class_mask, generated.class_mask)
    assert 0.13 <= np.mean(plain) <= 0.37


def test_segmenter_trains_on_its_training_scale_and_ships_its_served_one(monkeypatch) -> None:
    seen = []
    real = training.segmentation_tile

    def spy(rng, preprocess, plain_share=0.0):
        seen.append(tuple(preprocess.scale))
        return real(rng, preprocess, plain_share)

    monkeypatch.setattr(training, "segmentation_tile", spy)
    recipe = dataclasses.replace(SEGMENT, steps=1, batch=2, pool=3, aux_weight=0.4)
    model = training.train_segmenter(recipe, log=lambda _: None).model
    assert seen == [SEGMENT.train_scale] * 3 and SEGMENT.train_scale != SEGMENT.scale
    assert tuple(_preprocess(model).scale) == SEGMENT.scale
    # The auxiliary heads train beside the model and are not part of it.
    assert model.state_dict().keys() == build_segmenter(recipe).state_dict().keys()
