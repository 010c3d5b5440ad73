"""Train the three demo models on synthetic shapes and export them as demo bundles.

    python -m model_export.demo.train [--out service/demo_bundles] [--only TASK ...]

Each model is a tiny configuration of a real variant (HorNet-GF classifier, UperNet with
a HorFPN head, Mask R-CNN with a HorFPN neck) trained on this CPU, one thread. The
segmenter trains from scratch and its trunk starts the detector and the classifier
(from scratch the tiny GF classifier learned slowly and unevenly: 0.94 accuracy after
3000 steps, 0.77 after 4500 at a higher learning rate; from the segmenter's trunk, 0.975
after 3000 of its 4000 steps). Training data goes through the service's own preprocessing
(`service.imaging`), so the models see what the served graph sees. Every random draw is
seeded (single-threaded runs repeat exactly); the seeds and this command are recorded in
each bundle's manifest (`export.demo_training`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from hornet_bundle import MANIFEST_NAME, Manifest, Preprocess, write_manifest
from model_export import create_model
from model_export.demo.shapes import (
    CLASS_NAMES,
    SEGMENT_LABELS,
    generate_sample,
    generate_scene,
)
from model_export.export import ExportOptions, ParityImages, export
from service import imaging

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "service" / "demo_bundles"
COMMAND = "python -m model_export.demo.train"
# One thread: on a small shared CPU, two threads of tiny ops spend their time waiting on
# each other (measured 10x slower per step than one thread on the 2-core build machine).
THREADS = 1


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


CLASSIFY = Recipe(
    name="shapes_classify",
    variant="hornet_tiny_gf",
    overrides=dict(base_dim=16, depths=(1, 1, 2, 1), image_size=64),
    steps=4000,
    batch=32,
    lr=1e-3,
    data_seed=1001,
    torch_seed=11,
)
SEGMENT = Recipe(
    name="shapes_segment",
    variant="horfpn_gf_upernet_hornet_small_7x7",
    overrides=dict(base_dim=16, depths=(1, 1, 1, 1), channels=32, image_size=96),
    steps=6000,
    batch=12,
    lr=3e-3,
    data_seed=2002,
    torch_seed=22,
)
DETECT = Recipe(
    name="shapes_detect",
    variant="horfpn_7x7_mask_rcnn_hornet_tiny_7x7",
    overrides=dict(base_dim=16, depths=(1, 1, 1, 1), fpn_channels=32, min_size=192, max_size=256),
    steps=2000,
    batch=4,
    lr=1e-3,
    data_seed=3003,
    torch_seed=33,
)
RECIPES = {"segment": SEGMENT, "detect": DETECT, "classify": CLASSIFY}
# Training images: random sizes in this range (height and width drawn independently).
TRAIN_SIZES = (48, 320)
# Layer-scale start for the tiny from-scratch backbones (the release's 1e-6 suits long
# ImageNet schedules; 0.1 lets a few hundred steps move the blocks).
GAMMA_INIT = 0.1
# Detection head widths of the tiny Mask R-CNN (torchvision's are 1024 and 256).
BOX_HEAD_DIM = 256
MASK_HEAD_DIMS = (64, 64)
RPN_TRAIN_TOP_N = 600
# Background pixels outnumber shape pixels several times; halving their loss weight keeps
# the segmenter working on telling the shapes apart.
SEG_BACKGROUND_WEIGHT = 0.5
# Images are fitted into this (long, short) scale as mmseg's keep-ratio Resize does: the
# short side mostly lands on 96, the tile's side, so shapes (radius 9-20% of the short
# side) come out 17-38 px across, the sizes the classifier also learns from, and tiles
# slide along the long side only. Measured on the shapes test set after 1500 steps: mIoU
# 0.48 against 0.41 with a 192 long side.
SEG_SCALE = (192, 96)
ROI_BATCH = 128
# Detection parity images: on the exporter's noise images a trained shapes detector
# rightly finds nothing.
PARITY_SEED = 4004
PARITY_SIZES = ((180, 240), (150, 120))


# --- data -----------------------------------------------------------------------------------


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(*TRAIN_SIZES)), int(rng.integers(*TRAIN_SIZES))


def _normalise(batch: np.ndarray, mean, std, pixel_range: int) -> torch.Tensor:
    """uint8 NHWC -> float NCHW normalised as the exported graph does inside."""
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    if pixel_range == 1:
        x = x / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _augment(images: torch.Tensor, rng: np.random.Generator, *targets: torch.Tensor):
    """Random flips and quarter turns, applied alike to images (N, C, H, W) and targets
    (N, H, W): the shapes' classes are invariant under them."""
    if rng.random() < 0.5:
        images, targets = images.flip(-1), tuple(t.flip(-1) for t in targets)
    turns = int(rng.integers(4))
    images = torch.rot90(images, turns, (-2, -1))
    return (images, *(torch.rot90(t, turns, (-2, -1)) for t in targets))


def classification_batch(
    rng: np.random.Generator, preprocess: Preprocess, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`size` samples of random image sizes through the service's classification crop."""
    crops, labels = [], []
    for _ in range(size):
        image, label = generate_sample(rng, *_random_size(rng))
        crops.append(imaging.classification_input(Image.fromarray(image), preprocess))
        labels.append(label)
    return np.stack(crops), np.array(labels, dtype=np.int64)


def segmentation_tile(
    rng: np.random.Generator, preprocess: Preprocess
) -> tuple[np.ndarray, np.ndarray]:
    """One scene fitted to the bundle's scale and cut into one of the service's sliding
    windows, chosen at random; the class mask follows with nearest resizing, and 255
    (ignored) on any padding."""
    scene = generate_scene(rng, *_random_size(rng))
    height, width = scene.class_mask.shape
    fit_h, fit_w = imaging.fit_size(height, width, preprocess.scale)
    image = imaging.resize_linear_uint8(scene.image, fit_h, fit_w, preprocess.resize_backend)
    mask = np.asarray(
        Image.fromarray(scene.class_mask).resize((fit_w, fit_h), Image.Resampling.NEAREST)
    )
    window = preprocess.sliding_window
    boxes = list(imaging.window_boxes(fit_h, fit_w, window))
    box = boxes[int(rng.integers(len(boxes)))]
    tile = imaging.tile(image, box, window.crop)
    y1, y2, x1, x2 = box
    target = np.full(window.crop, 255, dtype=np.uint8)
    target[: y2 - y1, : x2 - x1] = mask[y1:y2, x1:x2]
    return tile, target


def detection_sample(rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """One scene as torchvision's detection input: float CHW in [0, 1] and its targets
    (labels shifted by one: torchvision's class 0 is the background)."""
    scene = generate_scene(rng, *_random_size(rng))
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0
    target = {
        "boxes": torch.from_numpy(scene.boxes),
        "labels": torch.from_numpy(scene.labels + 1),
        "masks": torch.from_numpy(scene.masks.astype(np.uint8)),
    }
    return image, target


# --- models ---------------------------------------------------------------------------------


def transfer_trunk(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy into `target` every tensor of a trained HorNet trunk `source` whose name and
    shape it shares (stem, downsampling, 7x7 stages, norms); returns the names copied.

    The segmenter's and the detector's trunks are the same tiny HorNet-7x7, and the
    classifier's first two stages (7x7 in HorNet-GF too) and its 1x1 projections match
    them, so the segmenter's trunk (trained on dense, pixel-exact labels, the richest
    signal) starts both.
    """
    theirs = source.state_dict()
    ours = target.state_dict()
    shared = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    target.load_state_dict(shared, strict=False)
    return sorted(shared)


def _start_layer_scales(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma1", "gamma2")):
                param.fill_(GAMMA_INIT)


def build_classifier() -> nn.Module:
    model = create_model(CLASSIFY.variant, num_classes=len(CLASS_NAMES), **CLASSIFY.overrides)
    cfg = model.pretrained_cfg
    model.pretrained_cfg = dataclasses.replace(
        cfg, label_set=None, extra=cfg.extra | {"labels": list(CLASS_NAMES), "trained": True}
    )
    _start_layer_scales(model)
    return model


def build_segmenter() -> nn.Module:
    """The tiny UperNet; images are fitted to SEG_SCALE and cut into tiles."""
    model = create_model(SEGMENT.variant, num_classes=len(SEGMENT_LABELS), **SEGMENT.overrides)
    cfg = model.pretrained_cfg
    tile = cfg.image_size
    preprocess = cfg.extra["preprocess"] | {
        "input_size": (tile, tile),
        "scale": SEG_SCALE,
        "resize_backend": "pil",
        "sliding_window": {"crop": (tile, tile), "stride": (tile * 2 // 3,) * 2},
    }
    model.pretrained_cfg = dataclasses.replace(
        cfg, label_set=None, extra=cfg.extra | {"preprocess": preprocess}
    )
    _start_layer_scales(model)
    return model


def build_detector() -> nn.Module:
    """The tiny Mask R-CNN with narrower box and mask heads than torchvision's defaults
    (HorNetMaskRCNN does not take head widths, so they are swapped in here)."""
    model = create_model(DETECT.variant, num_classes=len(CLASS_NAMES), **DETECT.overrides)
    channels = model.backbone.out_channels
    resolution = model.roi_heads.box_roi_pool.output_size[0]
    heads = model.roi_heads
    heads.box_head = TwoMLPHead(channels * resolution**2, BOX_HEAD_DIM)
    heads.box_predictor = FastRCNNPredictor(BOX_HEAD_DIM, len(CLASS_NAMES) + 1)
    heads.mask_head = MaskRCNNHeads(channels, list(MASK_HEAD_DIMS), 1)
    heads.mask_predictor = MaskRCNNPredictor(
        MASK_HEAD_DIMS[-1], MASK_HEAD_DIMS[-1], len(CLASS_NAMES) + 1
    )
    heads.fg_bg_sampler.batch_size_per_image = ROI_BATCH
    model.rpn._pre_nms_top_n["training"] = RPN_TRAIN_TOP_N
    model.rpn._post_nms_top_n["training"] = RPN_TRAIN_TOP_N
    cfg = model.pretrained_cfg
    min_size, max_size = DETECT.overrides["min_size"], DETECT.overrides["max_size"]
    preprocess = cfg.extra["preprocess"] | {
        "input_size": (min_size, max_size),
        "scale": (max_size, min_size),
    }
    model.pretrained_cfg = dataclasses.replace(
        cfg,
        label_set=None,
        extra=cfg.extra | {"preprocess": preprocess, "min_size": min_size, "max_size": max_size},
    )
    _start_layer_scales(model)
    return model


# --- training -------------------------------------------------------------------------------


def _optimiser(model: nn.Module, recipe: Recipe) -> tuple[torch.optim.Optimizer, Callable]:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    other = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    warmup = max(1, recipe.steps // 20)

    def schedule(step: int) -> None:
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (recipe.steps - warmup)))
        for group in optimiser.param_groups:
            group["lr"] = recipe.lr * factor

    return optimiser, schedule


def _train(
    model: nn.Module, recipe: Recipe, loss_of_step: Callable[[int], torch.Tensor], log: Callable
) -> float:
    """Run the recipe's steps; returns the mean loss of the last tenth."""
    optimiser, schedule = _optimiser(model, recipe)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(recipe.steps):
        schedule(step)
        loss = loss_of_step(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimiser.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(
                f"{recipe.name} step {step + 1}/{recipe.steps} loss "
                f"{np.mean(losses[-50:]):.4f} ({time.perf_counter() - started:.0f} s)"
            )
    model.eval()
    return float(np.mean(losses[-max(1, recipe.steps // 10) :]))


def train_classifier(log: Callable = print, trunk: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(CLASSIFY.torch_seed)
    rng = np.random.default_rng(CLASSIFY.data_seed)
    model = build_classifier()
    if trunk is not None:
        copied = transfer_trunk(trunk, model)
        log(f"shapes_classify: {len(copied)} tensors from the segmenter")
    cfg = model.pretrained_cfg
    preprocess = Preprocess(**cfg.preprocess())

    def loss_of_step(step: int) -> torch.Tensor:
        crops, labels = classification_batch(rng, preprocess, CLASSIFY.batch)
        x = _normalise(crops, cfg.mean, cfg.std, 1)
        (x,) = _augment(x, rng)
        return F.cross_entropy(model(x), torch.from_numpy(labels), label_smoothing=0.05)

    model.final_loss = _train(model, CLASSIFY, loss_of_step, log)
    return model


def train_segmenter(log: Callable = print) -> nn.Module:
    torch.manual_seed(SEGMENT.torch_seed)
    rng = np.random.default_rng(SEGMENT.data_seed)
    model = build_segmenter()
    cfg = model.pretrained_cfg
    preprocess = Preprocess(**cfg.preprocess())

    def loss_of_step(step: int) -> torch.Tensor:
        tiles, targets = zip(
            *(segmentation_tile(rng, preprocess) for _ in range(SEGMENT.batch)), strict=True
        )
        x = _normalise(np.stack(tiles), cfg.mean, cfg.std, preprocess.pixel_range)
        x, y = _augment(x, rng, torch.from_numpy(np.stack(targets)).long())
        weight = torch.tensor([SEG_BACKGROUND_WEIGHT] + [1.0] * len(CLASS_NAMES))
        return F.cross_entropy(model(x), y, weight=weight, ignore_index=255)

    model.final_loss = _train(model, SEGMENT, loss_of_step, log)
    return model


def train_detector(log: Callable = print, trunk: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(DETECT.torch_seed)
    rng = np.random.default_rng(DETECT.data_seed)
    model = build_detector()
    if trunk is not None:
        copied = transfer_trunk(trunk, model.backbone.backbone)
        log(f"shapes_detect: {len(copied)} tensors from the segmenter")

    def loss_of_step(step: int) -> torch.Tensor:
        images, targets = zip(*(detection_sample(rng) for _ in range(DETECT.batch)), strict=True)
        losses = model(list(images), list(targets))
        return sum(losses.values())

    model.final_loss = _train(model, DETECT, loss_of_step, log)
    return model


# --- export ---------------------------------------------------------------------------------


def _training_record(recipe: Recipe, model: nn.Module, seconds: float) -> dict:
    return {
        "command": f"{COMMAND} --only {recipe.name.removeprefix('shapes_')}",
        "data": "model_export.demo.shapes (synthetic circles, squares, triangles)",
        "variant_overrides": {
            k: list(v) if isinstance(v, tuple) else v for k, v in recipe.overrides.items()
        },
        "steps": recipe.steps,
        "batch": recipe.batch,
        "lr": recipe.lr,
        "data_seed": recipe.data_seed,
        "torch_seed": recipe.torch_seed,
        "final_loss": round(model.final_loss, 5),
        "train_seconds": round(seconds, 1),
        "torch_threads": THREADS,
    }


def mark_demo(bundle_dir: Path, labels: list[str], description: str, training: dict) -> Manifest:
    """Rewrite an exported manifest as a demo bundle's: `demo` true, trained weights, the
    shapes labels, the training record; validated and re-hashed through `write_manifest`."""
    manifest = Manifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_text())
    if len(labels) != len(manifest.labels):
        raise ValueError(f"{bundle_dir}: {len(labels)} labels for {len(manifest.labels)} outputs")
    fields = manifest.model_dump(mode="json", exclude={"files", "tools"})
    fields |= {
        "demo": True,
        "weights": {"random": False},
        "labels": labels,
        "description": description,
        "export": fields["export"] | {"demo_training": training},
    }
    return write_manifest(bundle_dir, fields)


def export_classifier(model: nn.Module, out_dir: Path) -> Manifest:
    options = ExportOptions(name=CLASSIFY.name, labels=CLASS_NAMES, demo=True)
    return export(model, out_dir, options)


def export_segmenter(model: nn.Module, out_dir: Path) -> Manifest:
    return export(model, out_dir, ExportOptions(name=SEGMENT.name))


def export_detector(model: nn.Module, out_dir: Path) -> Manifest:
    """Checked on shapes scenes, with the exporter's pairing and tolerances."""
    rng = np.random.default_rng(PARITY_SEED)
    images = [generate_scene(rng, h, w).image for h, w in PARITY_SIZES]
    shapes = ParityImages(images, f"shapes scenes (seed {PARITY_SEED})")
    return export(model, out_dir, ExportOptions(name=DETECT.name, parity_images=shapes))


TASKS: dict[str, tuple[Recipe, Callable, Callable, list[str], str]] = {
    "classify": (
        CLASSIFY,
        train_classifier,
        export_classifier,
        list(CLASS_NAMES),
        "Demo: tiny HorNet-GF classifier of synthetic circles, squares and triangles "
        "(one shape per image).",
    ),
    "segment": (
        SEGMENT,
        train_segmenter,
        export_segmenter,
        list(SEGMENT_LABELS),
        "Demo: tiny UperNet with a HorFPN (GF) head segmenting synthetic circles, "
        "squares and triangles; images are fitted to a 96-pixel short side "
        "(192 long at most) and tiled.",
    ),
    "detect": (
        DETECT,
        train_detector,
        export_detector,
        list(CLASS_NAMES),
        "Demo: tiny Mask R-CNN with a HorFPN (7x7) neck detecting synthetic circles, "
        "squares and triangles.",
    ),
}


def build_bundle(
    task: str, out_root: Path, trunk: nn.Module | None, log: Callable = print
) -> tuple[Manifest, nn.Module]:
    """Train one demo model (from `trunk` when given), export it, mark it a demo bundle."""
    recipe, train, export, labels, description = TASKS[task]
    started = time.perf_counter()
    model = train(log) if trunk is None else train(log, trunk)
    seconds = time.perf_counter() - started
    log(f"{recipe.name}: trained in {seconds:.0f} s, final loss {model.final_loss:.4f}")
    out_dir = out_root / recipe.name
    export(model, out_dir)
    training = _training_record(recipe, model, seconds)
    if trunk is not None:
        training["trunk_from"] = f"{SEGMENT.name} (its backbone after the full recipe)"
    return mark_demo(out_dir, labels, description, training), model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundles root")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(RECIPES),
        help="build these bundles only (classify and detect start from the segmenter's "
        "trunk: it is trained first unless segment is built in the same run)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    tasks = [t for t in RECIPES if args.only is None or t in args.only]
    segmenter = None
    for task in tasks:
        trunk = None
        if task in ("detect", "classify"):
            # Single-threaded training repeats exactly, so this is the shipped segmenter's
            # trunk whether it was trained in this run or is trained again here.
            segmenter = segmenter or train_segmenter()
            trunk = segmenter.backbone
        manifest, model = build_bundle(task, args.out, trunk)
        if task == "segment":
            segmenter = model
        _report(args.out, manifest)


def _report(out_root: Path, manifest: Manifest) -> None:
    print(
        json.dumps(
            {
                "bundle": str(out_root / manifest.name),
                "task": manifest.task,
                "files": {k: v.bytes for k, v in manifest.files.items()},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
