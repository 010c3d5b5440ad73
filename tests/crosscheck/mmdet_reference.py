"""The mmdet side of the detection cross-check; runs in the OpenMMLab environment
(tools/make_mm_env.sh), never in the project's.

For each requested config of mmdet_configs.py (tiny widths unless `full` is asked) it
builds mmdet 2.28's detector (CascadeRCNN or MaskRCNN) with mmdet's own code (FPN,
RPNHead, AnchorGenerator, DeltaXYWHBBoxCoder, SingleRoIExtractor, CascadeRoIHead /
StandardRoIHead, ConvFCBBoxHead, FCNMaskHead, multiclass_nms, test pipeline, mask
pasting), where two modules are ours, registered under the official names: the backbone
`HorNet` (model_export.hornet, proven equal to the official one) and the HorFPN neck
`GNFPN` (model_export.horfpn.FPN with the gnConv fusion, built from the config's
`gn_conv_cfg`). mmcv's compiled RoIAlign and NMS kernels are torchvision's
(mmcv_ext_detection.py). It fills the model with seeded non-trivial weights, saves them
with mmcv's `save_checkpoint` (the release's layout, meta CLASSES included), and runs
`inference_detector` on each photograph, writing `<config>/<photo>.npz`: boxes (D, 4) in
original pixels, scores, labels and the binary full-size masks, best first.

Usage: python mmdet_reference.py OUT_DIR SEED CONFIG[:full][,...] PHOTO.png [...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mmcv_ext_detection  # noqa: E402

mmcv_ext_detection.install()

import mmcv  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmcv.cnn.utils import revert_sync_batchnorm  # noqa: E402
from mmcv.runner import save_checkpoint  # noqa: E402
from mmdet.apis import inference_detector, init_detector  # noqa: E402
from mmdet.core import get_classes  # noqa: E402
from mmdet.models.builder import BACKBONES, NECKS  # noqa: E402
from mmdet_configs import CONFIGS, tiny  # noqa: E402
from official_hornet import OfficialHorNet  # noqa: E402

from model_export.horfpn import FPN, HORFPN_GF_SIZE, HORFPN_KERNEL, HORFPN_ORDER  # noqa: E402
from tests.helpers.dense_tiny import randomize_  # noqa: E402

BACKBONES.register_module(name="HorNet", module=OfficialHorNet)


@NECKS.register_module(name="GNFPN")
class HorFPNNeck(FPN):
    """The official GNFPN as Mask R-CNN configures it (no extra convs, no norm), ours."""

    def __init__(self, in_channels, out_channels, num_outs, gn_conv_cfg, init_cfg=None):
        options = dict(kernel_size=7, type="gnconv", proj_out=True, order=2, h=32, w=17)
        options |= gn_conv_cfg
        mixer = {"gnconv": "7x7", "gngf": "gf"}[options["type"]]
        if (
            num_outs != len(in_channels) + 1
            or options["order"] != HORFPN_ORDER
            or not options["proj_out"]
            or (mixer == "7x7" and options["kernel_size"] != HORFPN_KERNEL)
            or (mixer == "gf" and (options["h"], options["w"]) != HORFPN_GF_SIZE)
        ):
            raise ValueError(f"GNFPN {gn_conv_cfg}, num_outs {num_outs} differ from ours")
        super().__init__(in_channels, out_channels, fusion=mixer)

    def init_weights(self):
        """The weights come from the seeded fill below."""

    def forward(self, features):
        return tuple(super().forward(features).values())


# How much wider than ~1/sqrt(fan-in) the box heads' class weights are drawn, so that the
# final scores spread over (0.05, 1) as a trained detector's do, without saturating at 1
# (ties) or staying at the 0.05 threshold. The cascade averages three stages' logits.
FC_CLS_SCALE = {"CascadeRCNN": 16.0, "MaskRCNN": 1.0}


def detections(result) -> dict[str, np.ndarray]:
    """mmdet's per-class (bbox, segm) lists as arrays, best first."""
    bbox_result, segm_result = result
    boxes, labels, masks = [], [], []
    for label, (class_boxes, class_masks) in enumerate(zip(bbox_result, segm_result, strict=True)):
        boxes.extend(class_boxes)
        labels.extend([label] * len(class_boxes))
        masks.extend(class_masks)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 5)
    order = np.argsort(-boxes[:, 4], kind="stable")
    return {
        "boxes": boxes[order, :4],
        "scores": boxes[order, 4],
        "labels": np.asarray(labels, np.int64)[order],
        "masks": np.asarray(masks, bool)[order],
    }


def run_config(spec: str, seed: int, photos: list[Path], out: Path) -> dict:
    name, _, size = spec.partition(":")
    config = CONFIGS[name] if size == "full" else tiny(CONFIGS[name])
    if size == "full":  # a minute or more per photograph at full size: the first one only
        photos = photos[:1]
    model = revert_sync_batchnorm(init_detector(mmcv.Config(config), device="cpu")).eval()
    randomize_(model, seed, fc_cls_scale=FC_CLS_SCALE[config["model"]["type"]])
    model.CLASSES = tuple(get_classes("coco"))
    meta = dict(CLASSES=model.CLASSES, config=mmcv.Config(config).pretty_text)
    save_checkpoint(model, str(out / "mmdet.pth"), meta=meta)
    seconds = {}
    for photo in photos:
        start = time.perf_counter()
        with torch.no_grad():
            result = inference_detector(model, str(photo))
        np.savez_compressed(out / f"{photo.stem}.npz", **detections(result))
        seconds[photo.stem] = round(time.perf_counter() - start, 2)
    return seconds


def main(argv: list[str]) -> None:
    out, seed, specs, *photos = argv
    torch.set_num_threads(2)
    report = {}
    for spec in specs.split(","):
        name, _, size = spec.partition(":")
        folder = Path(out) / (f"{name}-{size}" if size else name)
        folder.mkdir(parents=True, exist_ok=True)
        report[spec] = run_config(spec, int(seed), [Path(p) for p in photos], folder)
    versions = {m.__name__: m.__version__ for m in (mmcv, torch, np)}
    versions["mmdet"] = __import__("mmdet").__version__
    (Path(out) / "report.json").write_text(json.dumps({"seconds": report, "versions": versions}))


if __name__ == "__main__":
    main(sys.argv[1:])
