"""The demo models as data: each one's variant, tiny overrides, schedule and seeds, and the
settings their training shares.

Every random draw of the demo training is seeded from here, and each bundle's manifest
records its recipe (`export.demo_training`), so a run on one thread repeats exactly.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One demo model: the variant, its tiny overrides, and how long to train it."""

    name: str
    variant: str
    overrides: dict
    steps: int
    batch: int
    lr: float
    data_seed: int
    torch_seed: int
    # Samples drawn once before training and sampled with replacement at each step (0:
    # fresh samples every step). Drawing a repainted image costs more than a step of the
    # tiny classifier, so a pool lets the same CPU time take many more steps.
    pool: int = 0
    # Weight of the auxiliary per-pixel losses on the trunk's last three stages (see
    # training.train_classifier and train_segmenter); 0: none.
    aux_weight: float = 0.0
    # Share of training scenes left as the generator paints them rather than repainted
    # (segmenter only): broad images alone cost it the plain scenes it started from.
    plain_share: float = 0.0
    # Segmenter: images are fitted into this (long, short) scale, as mmseg's keep-ratio
    # Resize does, then cut into tiles of the input size.
    scale: tuple[int, int] | None = None
    # Segmenter: the training tiles are cut from images fitted to this scale instead
    # (None: `scale`).
    train_scale: tuple[int, int] | None = None
    # Segmenter: the sliding window's stride (None: two thirds of the tile).
    stride: int | None = None


CLASSIFY = Recipe(
    name="shapes_classify",
    variant="hornet_tiny_gf",
    overrides=dict(base_dim=16, depths=(1, 1, 2, 1), image_size=96),
    steps=7000,
    batch=64,
    lr=2e-3,
    data_seed=1001,
    torch_seed=11,
    pool=24000,
    aux_weight=0.5,
)
# The segmenter whose trunk starts the detector: SEGMENT as of commit ad8eadc (broad
# images only, short side 96), written out in full so that the shipped detector rebuilds
# exactly whatever SEGMENT becomes.
DETECT_TRUNK = Recipe(
    name="shapes_segment",
    variant="horfpn_gf_upernet_hornet_small_7x7",
    # A tiny network of our own on the HorFPN UperNet's structure: its fusion module has
    # no proj_out (the official configs' proj_out=True is for their released weights), as
    # the shipped demo bundle was trained.
    overrides=dict(
        base_dim=16, depths=(1, 1, 1, 1), channels=32, image_size=96, fusion_proj_out=False
    ),
    steps=8000,
    batch=12,
    lr=3e-3,
    data_seed=2002,
    torch_seed=22,
    pool=30000,
    scale=(192, 96),
)
# The shipped segmenter: the trunk's seeds and head, one more block in stage 3, 128-pixel
# tiles overlapping by half, a larger pool with a quarter of the scenes left plain, and
# auxiliary per-pixel losses on the trunk's last three stages (without them, the same
# recipe for 12000 steps reached a mean IoU of 0.824 on the second renderer, not 0.948).
SEGMENT = dataclasses.replace(
    DETECT_TRUNK,
    overrides=DETECT_TRUNK.overrides | dict(depths=(1, 1, 2, 1), image_size=128),
    steps=10000,
    batch=16,
    pool=40000,
    aux_weight=0.4,
    plain_share=0.25,
    # Trained on tiles of images fitted to a 128-pixel short side (scene shapes of radius
    # 8-38 px) and served at 192: the network calls shapes best at about 1.5 times the
    # size it saw most. Served at 128 this network's mean IoU on the second renderer's
    # scenes was 0.875, at 160 0.926, at 192 0.948 (0.949 and 0.967 on the project's own
    # scenes at 160 and 192).
    train_scale=(256, 128),
    scale=(384, 192),
    stride=64,
)
DETECT = Recipe(
    name="shapes_detect",
    variant="horfpn_7x7_mask_rcnn_hornet_tiny_7x7",
    # Shapes never overlap: one NMS over all classes keeps one box per shape.
    overrides=dict(
        base_dim=16,
        depths=(1, 1, 1, 1),
        fpn_channels=32,
        min_size=192,
        max_size=256,
        class_agnostic_nms=True,
    ),
    steps=3000,
    batch=4,
    lr=1e-3,
    data_seed=3003,
    torch_seed=33,
)
# One thread: on a small shared CPU, two threads of tiny ops spend their time waiting on
# each other (measured 10x slower per step than one thread on the 2-core build machine).
THREADS = 1
# Layer-scale start for the tiny from-scratch backbones (the release's 1e-6 suits long
# ImageNet schedules; 0.1 lets a few hundred steps move the blocks).
GAMMA_INIT = 0.1
# Detection head widths of the tiny Mask R-CNN (torchvision's are 1024 and 256).
BOX_HEAD_DIM = 256
MASK_HEAD_DIMS = (64, 64)
# torchvision's MaskRCNN settings of the tiny detector's training (its defaults: 2000
# proposals before and after NMS, 512 sampled RoIs per image).
DETECT_TRAINING = dict(
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=600,
    box_batch_size_per_image=128,
)
# Background pixels outnumber shape pixels several times; halving their loss weight keeps
# the segmenter working on telling the shapes apart.
SEG_BACKGROUND_WEIGHT = 0.5
# The same for the classifier's auxiliary per-pixel losses, where one shape of up to a
# few hundred pixels lies on thousands of background ones.
AUX_BACKGROUND_WEIGHT = 0.3
