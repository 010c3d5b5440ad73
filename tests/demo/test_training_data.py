"""The demo training data is what the served graphs see: the service's own preprocessing."""

from __future__ import annotations

import numpy as np
import torch

from hornet_bundle import Preprocess
from model_export.demo.data import classification_batch, detection_sample, segmentation_tile
from model_export.demo.models import (
    build_classifier,
    build_detector,
    build_segmenter,
    transfer_trunk,
)


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


def test_classification_batch_is_the_service_crop() -> None:
    preprocess = _preprocess(build_classifier())
    crops, labels = classification_batch(np.random.default_rng(1), preprocess, 6)
    assert crops.shape == (6, *preprocess.input_size, 3) and crops.dtype == np.uint8
    assert set(labels.tolist()) <= {0, 1, 2}


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
