"""The mmseg side of the segmentation cross-check; runs in the OpenMMLab environment
(tools/make_mm_env.sh), never in the project's.

For each requested config of mmseg_configs.py (at the tiny widths) it builds mmseg's
EncoderDecoder with mmseg's own code (UPerHead, PPM, FCNHead, slide inference, test
pipeline), where two modules are ours, registered under the official names: the backbone
`HorNet` (model_export.hornet, proven equal to the official one) and, for HorFPN,
`GNUPerHead` = mmseg's UPerHead with `fpn_bottleneck` replaced by our gnConv fusion
module, built from the config's `conv_cfg`. It fills the model with seeded non-trivial
weights, saves them with mmcv's `save_checkpoint` (the official file layout), and runs
`inference_segmentor`'s steps on each photograph, writing per photo `<name>.labels.npy`
(mmseg's label map) and `<name>.margin.npy` (top-1 minus top-2 class probability).

Usage: python mmseg_reference.py OUT_DIR SEED CONFIG_NAME[,...] PHOTO.png [...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mmcv_ext_stub  # noqa: E402

mmcv_ext_stub.install()

import mmcv  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmcv.cnn.utils import revert_sync_batchnorm  # noqa: E402
from mmcv.parallel import collate  # noqa: E402
from mmcv.runner import save_checkpoint  # noqa: E402
from mmseg.apis import init_segmentor  # noqa: E402
from mmseg.apis.inference import LoadImage  # noqa: E402
from mmseg.datasets.pipelines import Compose  # noqa: E402
from mmseg.models.builder import BACKBONES, HEADS  # noqa: E402
from mmseg.models.decode_heads import UPerHead  # noqa: E402
from mmseg_configs import CONFIGS, tiny  # noqa: E402
from official_hornet import OfficialHorNet  # noqa: E402

from model_export.horfpn import (  # noqa: E402
    HORFPN_GF_SIZE,
    HORFPN_KERNEL,
    HORFPN_ORDER,
    GnConvModule,
)
from tests.helpers.dense_tiny import randomize_  # noqa: E402

BACKBONES.register_module(name="HorNet", module=OfficialHorNet)


@HEADS.register_module(name="GNUPerHead")
class HorFPNUPerHead(UPerHead):
    """mmseg's UPerHead with HorFPN's gnConv module (ours) as `fpn_bottleneck`."""

    def __init__(self, conv_cfg, **kwargs):
        options = dict(kernel_size=3, dim_ratio=1, proj_out=False, order=2, h=32) | conv_cfg
        mixer = {"gnconv": "7x7", "gngf": "gf"}[options["type"]]
        if (
            options["order"] != HORFPN_ORDER
            or options["dim_ratio"] != 1
            or (mixer == "7x7" and options["kernel_size"] != HORFPN_KERNEL)
            or (mixer == "gf" and (options["h"], options["h"] // 2 + 1) != HORFPN_GF_SIZE)
        ):
            raise ValueError(f"conv_cfg {conv_cfg} differs from our HorFPN module")
        super().__init__(**kwargs)
        self.fpn_bottleneck = GnConvModule(
            len(self.in_channels) * self.channels,
            self.channels,
            mixer=mixer,
            proj_out=options["proj_out"],
        )


def prepare(model, path: Path) -> dict:
    """`inference_segmentor`'s input preparation (LoadImage + the test pipeline, collate,
    the CPU branch of its scatter)."""
    pipeline = Compose([LoadImage()] + model.cfg.data.test.pipeline[1:])
    data = collate([pipeline(dict(img=str(path)))], samples_per_gpu=1)
    data["img_metas"] = [i.data[0] for i in data["img_metas"]]
    return data


def run_config(name: str, seed: int, photos: list[Path], out: Path) -> dict:
    config = mmcv.Config(tiny(CONFIGS[name]))
    model = revert_sync_batchnorm(init_segmentor(config, device="cpu")).eval()
    randomize_(model, seed)
    save_checkpoint(model, str(out / "mmseg.pth"), meta=dict(config=config.pretty_text))
    seconds = {}
    for photo in photos:
        start = time.perf_counter()
        data = prepare(model, photo)
        with torch.no_grad():
            # EncoderDecoder.simple_test is this call and an argmax; the probabilities
            # are kept for the confidence margin.
            probs = model.inference(data["img"][0], data["img_metas"][0], rescale=True)[0]
        top2 = probs.topk(2, dim=0)
        np.save(out / f"{photo.stem}.labels.npy", top2.indices[0].numpy().astype(np.int16))
        np.save(out / f"{photo.stem}.margin.npy", (top2.values[0] - top2.values[1]).numpy())
        seconds[photo.stem] = round(time.perf_counter() - start, 2)
    return seconds


def main(argv: list[str]) -> None:
    out, seed, names, *photos = argv
    torch.set_num_threads(2)
    report = {}
    for name in names.split(","):
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
        report[name] = run_config(name, int(seed), [Path(p) for p in photos], Path(out) / name)
    versions = {m.__name__: m.__version__ for m in (mmcv, torch, np)}
    versions["mmseg"] = __import__("mmseg").__version__
    (Path(out) / "report.json").write_text(json.dumps({"seconds": report, "versions": versions}))


if __name__ == "__main__":
    main(sys.argv[1:])
