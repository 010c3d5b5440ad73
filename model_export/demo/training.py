"""Training the demo models: one seeded loop (AdamW, warmup then cosine, clipped
gradients) and each task's loss over its batches."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hornet_bundle import Preprocess
from model_export.demo.data import (
    augment,
    classification_pool,
    detection_sample,
    normalise,
    segmentation_tile,
)
from model_export.demo.models import (
    build_classifier,
    build_detector,
    build_segmenter,
    transfer_trunk,
)
from model_export.demo.recipes import (
    AUX_BACKGROUND_WEIGHT,
    CLASSIFY,
    DETECT,
    SEG_BACKGROUND_WEIGHT,
    SEGMENT,
    Recipe,
)
from model_export.demo.shapes import CLASS_NAMES, SEGMENT_LABELS

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trained demo model (in eval mode) and the mean loss of its last tenth of steps."""

    model: nn.Module
    final_loss: float


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


def _run_steps(
    model: nn.Module, recipe: Recipe, loss_of_step: Callable[[int], torch.Tensor], log: Log
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


def _seeded(
    recipe: Recipe, build: Callable[[Recipe], nn.Module]
) -> tuple[np.random.Generator, nn.Module]:
    """The recipe's data generator, and its model built after seeding torch (so its
    initialisation is the recipe's)."""
    torch.manual_seed(recipe.torch_seed)
    return np.random.default_rng(recipe.data_seed), build(recipe)


def _start_from(trunk: nn.Module | None, target: nn.Module, recipe: Recipe, log: Log) -> None:
    if trunk is not None:
        copied = transfer_trunk(trunk, target)
        log(f"{recipe.name}: {len(copied)} tensors from the segmenter")


def _batches(
    recipe: Recipe, rng: np.random.Generator, draw: Callable[[int], tuple], log: Log
) -> Callable[[], tuple]:
    """A step's batch: `draw(recipe.batch)` fresh arrays, or with `recipe.pool` rows
    picked (with replacement) from `draw(recipe.pool)`, drawn once here."""
    if not recipe.pool:
        return lambda: draw(recipe.batch)
    started = time.perf_counter()
    pool = draw(recipe.pool)
    log(f"{recipe.name}: {recipe.pool} samples drawn in {time.perf_counter() - started:.0f} s")

    def picked() -> tuple:
        pick = rng.integers(recipe.pool, size=recipe.batch)
        return tuple(a[pick] for a in pool)

    return picked


def _stage_heads(dims: Sequence[int], classes: int) -> nn.ModuleList:
    """The training-only auxiliary heads: a 1x1 convolution predicting every pixel's
    class from each trunk stage after the first (`dims`: all the stages' widths)."""
    return nn.ModuleList(nn.Conv2d(dim, classes, 1) for dim in dims[1:])


def _add_stage_losses(
    loss: torch.Tensor,
    heads: nn.ModuleList,
    stages: Sequence[torch.Tensor],
    pixels: torch.Tensor,
    weight: float,
    class_weight: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """`loss` plus `weight` times each head's per-pixel cross-entropy against `pixels`,
    its guesses upsampled bilinearly to the targets' size (added one stage at a time)."""
    for head, features in zip(heads, stages[1:], strict=True):
        guess = F.interpolate(head(features), size=pixels.shape[-2:], mode="bilinear")
        loss = loss + weight * F.cross_entropy(
            guess, pixels, weight=class_weight, ignore_index=ignore_index
        )
    return loss


def train_classifier(
    recipe: Recipe = CLASSIFY, log: Log = print, trunk: nn.Module | None = None
) -> Trained:
    """From scratch (or from `trunk`), on a pool of `recipe.pool` repainted one-shape
    images drawn before the first step.

    Besides the classification loss, the trunk's last three stages each get a 1x1
    convolution predicting every pixel's class (background or the shape's) from the
    image's class mask, upsampled, weighted by `recipe.aux_weight`: the per-pixel
    targets say where the shape is, which the image's one label does not. With
    photographs and textures behind the shapes, the tiny classifier trained on labels
    alone stayed near chance (loss 1.07 of 1.10 after 800 steps of 64); with these losses
    it reached 0.83 on the second renderer's images after 2500 steps. The convolutions
    exist only for training: the model exported is the classifier alone.
    """
    rng, model = _seeded(recipe, build_classifier)
    _start_from(trunk, model, recipe, log)
    heads = _stage_heads(model.dims, len(CLASS_NAMES) + 1)
    cfg = model.pretrained_cfg
    preprocess = Preprocess(**cfg.preprocess())
    batch = _batches(recipe, rng, lambda n: classification_pool(rng, preprocess, n), log)
    pixel_weight = torch.tensor([AUX_BACKGROUND_WEIGHT] + [1.0] * len(CLASS_NAMES))

    def loss_of_step(step: int) -> torch.Tensor:
        images, labels, masks = batch()
        x = normalise(images, cfg.mean, cfg.std, 1)
        x, pixels = augment(x, rng, torch.from_numpy(masks).long())
        stages = model.forward_stages(x)
        loss = F.cross_entropy(
            model.forward_head(stages[-1]), torch.from_numpy(labels), label_smoothing=0.05
        )
        return _add_stage_losses(loss, heads, stages, pixels, recipe.aux_weight, pixel_weight)

    trainable = nn.ModuleDict({"model": model, "heads": heads})
    return Trained(model, _run_steps(trainable, recipe, loss_of_step, log))


def train_segmenter(recipe: Recipe = SEGMENT, log: Log = print) -> Trained:
    """From scratch (the segmenter of `recipes.DETECT_TRUNK` starts the detector). With
    `recipe.pool`, on that many tiles drawn before the first step; with
    `recipe.train_scale`, the tiles cut from images fitted to it, not to the served scale.
    With `recipe.aux_weight`, a 1x1 convolution on each of the trunk's last three stages
    predicts every pixel's class too, as mmseg trains an auxiliary FCN head beside the
    UperNet; they exist only for training."""
    rng, model = _seeded(recipe, build_segmenter)
    cfg = model.pretrained_cfg
    preprocess = Preprocess(**cfg.preprocess())
    if recipe.train_scale is not None:
        preprocess = preprocess.model_copy(update={"scale": recipe.train_scale})
    weight = torch.tensor([SEG_BACKGROUND_WEIGHT] + [1.0] * len(CLASS_NAMES))

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        tiles = zip(
            *(segmentation_tile(rng, preprocess, recipe.plain_share) for _ in range(count)),
            strict=True,
        )
        return tuple(np.stack(a) for a in tiles)

    batch = _batches(recipe, rng, draw, log)
    # Built only when used: recipes without them draw the same initialisation as before.
    heads = (
        _stage_heads(model.backbone.out_channels, len(SEGMENT_LABELS))
        if recipe.aux_weight
        else None
    )

    def loss_of_step(step: int) -> torch.Tensor:
        images, masks = batch()
        x = normalise(images, cfg.mean, cfg.std, preprocess.pixel_range)
        x, y = augment(x, rng, torch.from_numpy(masks).long())
        stages = model.forward_features(x)
        logits = model.forward_logits(stages, y.shape[-2:])
        loss = F.cross_entropy(logits, y, weight=weight, ignore_index=255)
        if heads is None:
            return loss
        return _add_stage_losses(loss, heads, stages, y, recipe.aux_weight, weight, 255)

    trainable = model if heads is None else nn.ModuleDict({"model": model, "heads": heads})
    return Trained(model, _run_steps(trainable, recipe, loss_of_step, log))


def train_detector(
    recipe: Recipe = DETECT, log: Log = print, trunk: nn.Module | None = None
) -> Trained:
    rng, model = _seeded(recipe, build_detector)
    _start_from(trunk, model.backbone.backbone, recipe, log)

    def loss_of_step(step: int) -> torch.Tensor:
        images, targets = zip(*(detection_sample(rng) for _ in range(recipe.batch)), strict=True)
        losses = model(list(images), list(targets))
        return sum(losses.values())

    return Trained(model, _run_steps(model, recipe, loss_of_step, log))
