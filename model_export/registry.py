"""Variant registry: every named network is a factory plus a timm-style pretrained config.

The config is data read by everything downstream (the export manifest, the service's
preprocessing); nothing re-types a mean, a crop_pct or an interpolation elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike

from torch import nn

# Modules whose import registers variants. Loaded on first use of the registry.
_VARIANT_MODULES = ("model_export.hornet", "model_export.dense", "model_export.mmdet_detectors")


@dataclass(frozen=True)
class PretrainedCfg:
    """What a checkpoint of this variant expects: input, transform, label space."""

    task: str
    input_size: tuple[int, int, int]
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    label_set: str | None
    extra: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.input_size[-1]

    def at_image_size(self, image_size: int) -> PretrainedCfg:
        """The same variant served at another square size (GF filters are resized).

        Classification's evaluation transform depends on the size: below 384 resize
        the shorter side to size / 0.875 and center-crop, from 384 on resize directly.
        """
        if self.task != "classify":
            return dataclasses.replace(self, input_size=(3, image_size, image_size))
        return dataclasses.replace(
            self,
            input_size=(3, image_size, image_size),
            crop_pct=0.875 if image_size < 384 else 1.0,
        )

    def with_num_classes(self, num_classes: int) -> PretrainedCfg:
        if num_classes == self.num_classes:
            return self
        label_set = "imagenet-1k" if num_classes == 1000 and self.task == "classify" else None
        return dataclasses.replace(self, num_classes=num_classes, label_set=label_set)

    def preprocess(self) -> dict:
        """The manifest's `preprocess` section for a classifier of this config."""
        size = self.image_size
        return {
            "resize_mode": "shorter_side_center_crop" if self.crop_pct < 1.0 else "direct",
            "input_size": (size, size),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "resize_backend": "pil",
            "mean": self.mean,
            "std": self.std,
            "pixel_range": 1,
            "normalize_in_graph": True,
        } | self.extra.get("preprocess", {})


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[..., nn.Module]
    cfg: PretrainedCfg
    aliases: tuple[str, ...] = ()


_VARIANTS: dict[str, Variant] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register_variant(
    name: str, build: Callable[..., nn.Module], cfg: PretrainedCfg, aliases: tuple[str, ...] = ()
) -> None:
    if name in _VARIANTS or name in _ALIASES:
        raise ValueError(f"variant {name!r} registered twice")
    _VARIANTS[name] = Variant(name, build, cfg, aliases)
    for alias in aliases:
        _ALIASES[alias] = name


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _VARIANT_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def list_variants(task: str | None = None, aliases: bool = False) -> list[str]:
    """Official variant names (optionally only one task's, optionally with aliases)."""
    _ensure_loaded()
    names = [v.name for v in _VARIANTS.values() if task is None or v.cfg.task == task]
    if aliases:
        names += [a for a, n in _ALIASES.items() if task is None or _VARIANTS[n].cfg.task == task]
    return sorted(names)


def get_variant(name: str) -> Variant:
    _ensure_loaded()
    canonical = _ALIASES.get(name, name)
    if canonical not in _VARIANTS:
        raise KeyError(
            f"unknown variant {name!r}; valid names: {', '.join(list_variants(aliases=True))}"
        )
    return _VARIANTS[canonical]


# The square input sizes a variant may be built at (`image_size`).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048


def create_model(
    name: str,
    checkpoint: str | PathLike | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    **overrides,
) -> nn.Module:
    """Build a registered variant in eval mode, optionally loading a checkpoint.

    `num_classes=1000` on a 22k variant builds an ImageNet-1k classifier; a 22k
    checkpoint then loads by taking the head rows of the 1k synsets. `image_size` sizes
    the Global Filters for that input (checkpoint filters are resized to match).
    `overrides` reach the network constructor (e.g. `depths`, `base_dim` for tiny
    test configurations). The module carries its `pretrained_cfg`.
    """
    from model_export.checkpoint import load_checkpoint

    variant = get_variant(name)
    cfg = variant.cfg
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes {num_classes}: a classifier needs at least one class")
    if image_size is not None and not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image size {image_size}: HorNet downsamples its input 32 times, so at least "
            f"{MIN_IMAGE_SIZE}; and at most {MAX_IMAGE_SIZE} (a Global Filter's weights grow "
            "with the square of the size)"
        )
    if num_classes is not None:
        cfg = cfg.with_num_classes(num_classes)
    if image_size is not None:
        cfg = cfg.at_image_size(image_size)
    model = variant.build(num_classes=cfg.num_classes, image_size=cfg.image_size, **overrides)
    model.pretrained_cfg = cfg
    model.variant = variant.name
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()
