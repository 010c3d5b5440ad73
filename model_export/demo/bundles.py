"""The demo bundles: each demo model trained by its recipe and exported through
`export(...)` with what makes it a demo bundle (the `demo` flag, the shapes labels, a
description and the training record under `export.demo_training`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch import nn

from hornet_bundle import Manifest
from model_export.demo.recipes import CLASSIFY, DETECT, DETECT_TRUNK, SEGMENT, THREADS, Recipe
from model_export.demo.shapes import CLASS_NAMES, SEGMENT_LABELS, generate_scene
from model_export.demo.training import (
    Log,
    Trained,
    train_classifier,
    train_detector,
    train_segmenter,
)
from model_export.export import ExportOptions, ParityImages, export

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "service" / "demo_bundles"
COMMAND = "python -m model_export.demo.train"
# Detection parity images: on the exporter's noise images a trained shapes detector
# rightly finds nothing.
PARITY_SEED = 4004


@dataclasses.dataclass(frozen=True)
class DemoBundle:
    """One demo bundle: its task, the recipe and training function of its model, and
    what its manifest says beyond what the exporter writes."""

    task: str
    recipe: Recipe
    train: Callable[..., Trained]
    labels: Sequence[str]
    description: str
    # Parity is checked on shapes scenes of these (height, width) (else the exporter's own).
    parity_sizes: tuple[tuple[int, int], ...] = ()
    # The segmenter whose trained trunk starts this model (None: from scratch).
    trunk: Recipe | None = None


# By task, in the order they are built: the segmenter's trunk starts the detector.
BUNDLES = {
    bundle.task: bundle
    for bundle in (
        DemoBundle(
            "segment",
            SEGMENT,
            train_segmenter,
            SEGMENT_LABELS,
            "Demo: tiny UperNet with a HorFPN (GF) head segmenting synthetic circles, "
            f"squares and triangles; images are fitted to a {SEGMENT.scale[1]}-pixel short "
            f"side ({SEGMENT.scale[0]} long at most) and tiled.",
        ),
        DemoBundle(
            "detect",
            DETECT,
            train_detector,
            CLASS_NAMES,
            "Demo: tiny Mask R-CNN with a HorFPN (7x7) neck detecting synthetic circles, "
            "squares and triangles.",
            parity_sizes=((180, 240), (150, 120)),
            trunk=DETECT_TRUNK,
        ),
        DemoBundle(
            "classify",
            CLASSIFY,
            train_classifier,
            CLASS_NAMES,
            "Demo: tiny HorNet-GF classifier of synthetic circles, squares and triangles "
            "(one shape per image, anywhere: images are resized whole to "
            f"{CLASSIFY.overrides['image_size']}x{CLASSIFY.overrides['image_size']}).",
        ),
    )
}


def recipe_record(recipe: Recipe) -> dict:
    """A recipe as the manifest records it: its overrides, schedule, seeds and the
    options it sets."""
    return {
        "variant_overrides": {
            k: list(v) if isinstance(v, tuple) else v for k, v in recipe.overrides.items()
        },
        "steps": recipe.steps,
        "batch": recipe.batch,
        "lr": recipe.lr,
        "data_seed": recipe.data_seed,
        "torch_seed": recipe.torch_seed,
        **({"pool": recipe.pool} if recipe.pool else {}),
        **({"aux_weight": recipe.aux_weight} if recipe.aux_weight else {}),
        **({"plain_share": recipe.plain_share} if recipe.plain_share else {}),
        **({"scale": list(recipe.scale)} if recipe.scale else {}),
        **({"train_scale": list(recipe.train_scale)} if recipe.train_scale else {}),
        **({"stride": recipe.stride} if recipe.stride else {}),
    }


def training_record(bundle: DemoBundle, trained: Trained, seconds: float) -> dict:
    """The manifest's `export.demo_training`: the command and recipe that trained it, and
    the recipe of the segmenter whose trunk it started from."""
    return {
        "command": f"{COMMAND} --only {bundle.task}",
        "data": "model_export.demo.shapes (synthetic circles, squares, triangles) repainted "
        "by model_export.demo.appearance",
        **recipe_record(bundle.recipe),
        **({"trunk_from": recipe_record(bundle.trunk)} if bundle.trunk else {}),
        "final_loss": round(trained.final_loss, 5),
        "train_seconds": round(seconds, 1),
        "torch_threads": THREADS,
    }


def export_options(bundle: DemoBundle, training: dict) -> ExportOptions:
    parity_images = None
    if bundle.parity_sizes:
        rng = np.random.default_rng(PARITY_SEED)
        scenes = [generate_scene(rng, h, w).image for h, w in bundle.parity_sizes]
        parity_images = ParityImages(scenes, f"shapes scenes (seed {PARITY_SEED})")
    return ExportOptions(
        name=bundle.recipe.name,
        labels=bundle.labels,
        demo=True,
        description=bundle.description,
        parity_images=parity_images,
        export_extra={"demo_training": training},
    )


def build_bundle(
    bundle: DemoBundle, out_root: Path, trunk: nn.Module | None = None, log: Log = print
) -> tuple[Manifest, nn.Module]:
    """Train one demo model (from `trunk`, the trained segmenter of `bundle.trunk`, when
    it has one) and export it as a demo bundle in `out_root`/<recipe name>; returns its
    manifest and the trained model."""
    recipe = bundle.recipe
    if (trunk is None) != (bundle.trunk is None):
        raise ValueError(f"{recipe.name}: a trunk is given if and only if the bundle has one")
    started = time.perf_counter()
    if trunk is None:
        trained = bundle.train(recipe, log)
    else:
        trained = bundle.train(recipe, log, trunk)
    seconds = time.perf_counter() - started
    log(f"{recipe.name}: trained in {seconds:.0f} s, final loss {trained.final_loss:.4f}")
    training = training_record(bundle, trained, seconds)
    manifest = export(trained.model, out_root / recipe.name, export_options(bundle, training))
    return manifest, trained.model
