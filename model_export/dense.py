"""Dense-prediction variants: UperNet (ADE20K) and Mask R-CNN (COCO) over HorNet, plain or
with HorFPN. Imported by the registry on first use; names follow the official configs
without their schedule suffix (`upernet_hornet_tiny_gf`, `horfpn_gf_mask_rcnn_hornet_small_7x7`).

The seg configs carry the mmseg test pipeline as the manifest's preprocess fields
(`extra["preprocess"]`), so the service tiles exactly as mmseg's slide inference does.

`create_model` overrides reach the constructors, e.g. for tiny demo models:
- segmentation: `num_classes` (logit channels, background included when trained with
  one), `image_size` (tile; sizes the GF filters), `base_dim`, `depths`, `channels`
  (UPerHead width, 512 released);
- detection: `num_classes` (object classes; torchvision adds background), `base_dim`,
  `depths`, `fpn_channels` (256 released), `min_size`/`max_size` (the in-graph resize),
  `box_score_thresh`.
A `num_classes` other than the variant's drops its label set; pass names to the exporter
(`model_export.export.ExportOptions(labels=...)`).
"""

from __future__ import annotations

from model_export.mask_rcnn import MMDET_MEAN, MMDET_STD, HorNetMaskRCNN
from model_export.registry import PretrainedCfg, register_variant
from model_export.upernet import HorNetUperNet

BACKBONE_DIMS = {"tiny": 64, "small": 96, "base": 128, "large": 192}
MIXERS = ("7x7", "gf")
ADE20K_CLASSES = 150
COCO_CLASSES = 80
# Tile (crop), sliding stride and the fit scale (long, short) of the mmseg test pipeline.
SEG_TILES = {512: (341, (2048, 512)), 640: (426, (2560, 640))}
DETECTION_MIN_SIZE = 800
DETECTION_MAX_SIZE = 1333
# The released detectors' GF filters are the 224-px classifier's, resized at run time.
DETECTION_GF_IMAGE_SIZE = 224


def seg_cfg(tile: int) -> PretrainedCfg:
    stride, scale = SEG_TILES[tile]
    return PretrainedCfg(
        task="segment",
        input_size=(3, tile, tile),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=MMDET_MEAN,
        std=MMDET_STD,
        num_classes=ADE20K_CLASSES,
        label_set="ade20k",
        extra={
            "preprocess": {
                "resize_mode": "fit",
                "input_size": (tile, tile),
                "crop_pct": None,
                "interpolation": "bilinear",
                "resize_backend": "opencv",
                "pixel_range": 255,
                "normalize_in_graph": True,
                "scale": scale,
                "sliding_window": {"crop": (tile, tile), "stride": (stride, stride)},
            }
        },
    )


def detection_cfg() -> PretrainedCfg:
    """mmdet's Mask R-CNN test pipeline: fit (1333, 800), mean/std on 0-255 RGB.

    The resize runs inside the exported graph (torchvision's transform), so the host
    sends the decoded image as it is.
    """
    return PretrainedCfg(
        task="detect",
        input_size=(3, DETECTION_MIN_SIZE, DETECTION_MAX_SIZE),
        crop_pct=1.0,
        interpolation="bilinear",
        mean=MMDET_MEAN,
        std=MMDET_STD,
        num_classes=COCO_CLASSES,
        label_set="coco",
        extra={
            "preprocess": {
                "resize_mode": "fit",
                "input_size": (DETECTION_MIN_SIZE, DETECTION_MAX_SIZE),
                "crop_pct": None,
                "resize_backend": "pil",
                "pixel_range": 255,
                "normalize_in_graph": True,
                "scale": (DETECTION_MAX_SIZE, DETECTION_MIN_SIZE),
            },
            "min_size": DETECTION_MIN_SIZE,
            "max_size": DETECTION_MAX_SIZE,
        },
    )


def _register_upernet(name: str, size: str, mixer: str, fusion: str | None, tile: int) -> None:
    """A UperNet variant; with `fusion` its `fpn_bottleneck` is HorFPN's gnConv module as
    both official HorFPN configs set it (`conv_cfg`: order 2, kernel 7 or GF 32x17, and
    `proj_out=True`, although the head's own default is False)."""
    base_dim = BACKBONE_DIMS[size]

    def build(
        num_classes: int = ADE20K_CLASSES, image_size: int = tile, **overrides
    ) -> HorNetUperNet:
        kwargs = dict(
            base_dim=base_dim,
            gf=mixer == "gf",
            image_size=image_size,
            fusion=fusion,
            fusion_proj_out=fusion is not None,
        )
        return HorNetUperNet(num_classes=num_classes, **(kwargs | overrides))

    build.__name__ = name
    neck = f"HorFPN ({fusion}) fusion" if fusion else "UPerHead"
    build.__doc__ = f"{name}: UperNet, HorNet C={base_dim} {mixer} backbone, {neck}, {tile} tile."
    register_variant(name, build, seg_cfg(tile))


# The official config names of the three HorFPN-study Mask R-CNNs belong to the released
# mmdet-layout detectors (model_export.mmdet_detectors); this project's torchvision-layout
# family is `tv_<name>`, its former names staying as aliases where they are free.
OFFICIAL_MMDET_NAMES = frozenset(
    {
        "mask_rcnn_hornet_small_7x7",
        "horfpn_7x7_mask_rcnn_hornet_small_7x7",
        "horfpn_gf_mask_rcnn_hornet_small_7x7",
    }
)


def _register_mask_rcnn(name: str, size: str, mixer: str, fusion: str | None) -> None:
    base_dim = BACKBONE_DIMS[size]
    aliases = () if name in OFFICIAL_MMDET_NAMES else (name,)
    name = f"tv_{name}"

    def build(num_classes: int = COCO_CLASSES, image_size: int = 0, **overrides) -> HorNetMaskRCNN:
        """`image_size` is unused: detection inputs vary in size and GF filters keep the
        released 224-px sizes, resized to each feature map at run time."""
        kwargs = dict(
            base_dim=base_dim,
            gf=mixer == "gf",
            image_size=DETECTION_GF_IMAGE_SIZE,
            fusion=fusion,
            min_size=DETECTION_MIN_SIZE,
            max_size=DETECTION_MAX_SIZE,
        )
        return HorNetMaskRCNN(num_classes=num_classes, **(kwargs | overrides))

    build.__name__ = name
    neck = f"HorFPN ({fusion})" if fusion else "FPN"
    build.__doc__ = (
        f"{name}: Mask R-CNN (torchvision layout), HorNet C={base_dim} {mixer} backbone, "
        f"{neck} neck."
    )
    register_variant(name, build, detection_cfg(), aliases)


def _register_all() -> None:
    for size in BACKBONE_DIMS:
        tile = 640 if size == "large" else 512
        for mixer in MIXERS:
            _register_upernet(f"upernet_hornet_{size}_{mixer}", size, mixer, None, tile)
            _register_mask_rcnn(f"mask_rcnn_hornet_{size}_{mixer}", size, mixer, None)
            for fusion in MIXERS:
                _register_mask_rcnn(
                    f"horfpn_{fusion}_mask_rcnn_hornet_{size}_{mixer}", size, mixer, fusion
                )
    for fusion in MIXERS:
        _register_upernet(f"horfpn_{fusion}_upernet_hornet_small_7x7", "small", "7x7", fusion, 512)


_register_all()
