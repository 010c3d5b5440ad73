"""The released and configured mmdet detectors over HorNet, named after the official
configs (raoyongming/HorNet object_detection/configs/, schedule suffix dropped):

- `cascade_mask_rcnn_hornet_{tiny,small,base,large}_{7x7,gf}`: Cascade Mask R-CNN, FPN
  (configs/hornet/, the eight released COCO detectors);
- `mask_rcnn_hornet_small_7x7` (FPN) and `horfpn_{7x7,gf}_mask_rcnn_hornet_small_7x7`
  (HorFPN, the official GNFPN neck): Mask R-CNN (configs/horfpn/). This project's
  torchvision-layout Mask R-CNNs (model_export.dense) are `tv_*`.

Each carries mmdet's test pipeline as data: fit (1333, 800) with OpenCV bilinear,
mean/std on 0-255 RGB, pad to 32 (model_export.mmdet_pipeline), COCO's 80 labels from
torchvision's metadata unless the checkpoint's meta['CLASSES'] names others.
`create_model` overrides reach `MMDetHorNetDetector` (`num_classes`, `base_dim`,
`depths`, `fpn_channels`, `fc_channels` for tiny test configurations).
"""

from __future__ import annotations

from model_export.cascade_mask_rcnn import MMDetHorNetDetector
from model_export.mmdet_checkpoint import apply_mmdet_meta, mmdet_filter_fn
from model_export.mmdet_pipeline import SCALE, SIZE_DIVISOR
from model_export.registry import PretrainedCfg, register_variant

BACKBONE_DIMS = {"tiny": 64, "small": 96, "base": 128, "large": 192}
MIXERS = ("7x7", "gf")
COCO_CLASSES = 80
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)
# The GF filter sizes of each config, as the square classifier input they belong to:
# (14, 8) and (7, 4) for 224 px, (24, 13) and (12, 7) for 384 px (HorNet-L, whose
# pretrained GF backbone is the 384-px one). At run time they are resized to each map.
GF_IMAGE_SIZE = {"tiny": 224, "small": 224, "base": 224, "large": 384}


class MMDetDetector(MMDetHorNetDetector):
    """An mmdet-layout HorNet detector as a registered variant: loads mmdet files
    strictly and takes its label names from their meta['CLASSES']."""

    checkpoint_filter_fn = staticmethod(mmdet_filter_fn)

    def apply_checkpoint_meta(self, meta: dict, source: str) -> None:
        apply_mmdet_meta(self, meta, source)


def mmdet_detection_cfg() -> PretrainedCfg:
    """mmdet's test pipeline (configs/_base_/datasets/coco_instance.py), run on the
    host: the graph takes the resized, normalised, padded image."""
    return PretrainedCfg(
        task="detect",
        input_size=(3, min(SCALE), max(SCALE)),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=MMDET_MEAN,
        std=MMDET_STD,
        num_classes=COCO_CLASSES,
        label_set="coco",
        extra={
            "layout": "mmdet",
            "preprocess": {
                "resize_mode": "fit",
                "input_size": (min(SCALE), max(SCALE)),
                "crop_pct": None,
                "interpolation": "bilinear",
                "resize_backend": "opencv",
                "pixel_range": 255,
                "scale": SCALE,
            },
            "pad_size_divisor": SIZE_DIVISOR,
        },
    )


def _register(name: str, cascade: bool, size: str, mixer: str, fusion: str | None) -> None:
    base_dim = BACKBONE_DIMS[size]

    def build(num_classes: int = COCO_CLASSES, image_size: int = 0, **overrides):
        """`image_size` is unused: inputs vary in size and the GF filters keep the
        config's sizes, resized to each feature map at run time."""
        kwargs = dict(
            cascade=cascade,
            base_dim=base_dim,
            gf=mixer == "gf",
            image_size=GF_IMAGE_SIZE[size],
            fusion=fusion,
        )
        return MMDetDetector(num_classes=num_classes, **(kwargs | overrides))

    kind = "Cascade Mask R-CNN" if cascade else "Mask R-CNN"
    neck = f"HorFPN ({fusion})" if fusion else "FPN"
    build.__name__ = name
    build.__doc__ = f"{name}: mmdet {kind}, HorNet C={base_dim} {mixer}, {neck} neck."
    register_variant(name, build, mmdet_detection_cfg())


CASCADE_VARIANTS = tuple(
    f"cascade_mask_rcnn_hornet_{size}_{mixer}" for size in BACKBONE_DIMS for mixer in MIXERS
)
MASK_RCNN_VARIANTS = {
    "mask_rcnn_hornet_small_7x7": None,
    "horfpn_7x7_mask_rcnn_hornet_small_7x7": "7x7",
    "horfpn_gf_mask_rcnn_hornet_small_7x7": "gf",
}

for _size in BACKBONE_DIMS:
    for _mixer in MIXERS:
        _register(f"cascade_mask_rcnn_hornet_{_size}_{_mixer}", True, _size, _mixer, None)
for _name, _fusion in MASK_RCNN_VARIANTS.items():
    _register(_name, False, "small", "7x7", _fusion)
