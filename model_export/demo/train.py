"""Train the three demo models on synthetic shapes and export them as demo bundles.

    python -m model_export.demo.train [--out service/demo_bundles] [--only TASK ...]

Each model is a tiny configuration of a real variant (HorNet-GF classifier, UperNet with
a HorFPN head, Mask R-CNN with a HorFPN neck) trained on this CPU, one thread. The
segmenter trains from scratch and its trunk starts the detector; the classifier trains
from scratch with auxiliary per-pixel losses (`training.train_classifier`). Training data
goes through the served preprocessing (`hornet_bundle.preprocess`), so the models see
what the served graph sees. Every random draw is seeded (single-threaded runs repeat
exactly); the seeds and this command are recorded in each bundle's manifest
(`export.demo_training`).

Training images are repainted with broad appearance (`appearance`: textures and photos,
lower contrast, anti-aliased edges, blur, noise, JPEG) and the classifier resizes whole
images ("direct"). Judged on the second renderer (`python -m tests.demo.generalisation`,
150 images and 60 scenes, seed 0), for the shipped bundles:

- classifier: this command with `recipes.CLASSIFY` as its manifest records it
  (2026-12-02; 7000 steps of 64 images at 96x96 from a pool of 24000; 100 min on one
  contended core): accuracy 0.980 (0.983 and 0.983 on 300 images of seeds 1 and 2;
  0.992 on the project's own generator). At 64x64 (commit b5763de) it had 0.947: its
  misses were small shapes in small or long images, squares and triangles taken for
  each other; trained on labels alone (no auxiliary per-pixel losses) it stayed at
  chance loss (1.07 after 500 steps).
- detector: this command with `recipes.DETECT` as its manifest records it (3000 steps
  from the trunk of the segmenter of `recipes.DETECT_TRUNK`, broad images, one NMS over
  all classes; 70 min on a contended core): recall 0.976 at box IoU 0.5, 6.9% of the
  174 detections scored >= 0.5 false (seeds 1 and 2, 120 scenes each: recall 0.965 /
  0.979, false 8.3% / 11.7%); 83 of 86 shapes on the project's own scenes. The detector
  before it (2000 steps on the plain generator, per-class NMS) found 0.976 with 54%
  false: of its 173 false detections 102 fired on photographic backgrounds, 44 were a
  second box of another class on a shape already found, 10 the wrong class, 17 misplaced.
- segmenter: this command with `recipes.SEGMENT` as its manifest records it (10000 steps
  of 16 tiles of 128 px from a pool of 40000, a quarter of the scenes left plain, one
  more block in stage 3 than the detector's trunk, auxiliary per-pixel losses on the
  trunk's last three stages; 59 min on a contended core; served at a 192-pixel short
  side, 1.5 times the training images'): mean IoU 0.948 (background 0.996, circle 0.954,
  square 0.929, triangle 0.913; 0.933 and 0.935 on 120 scenes of seeds 1 and 2) and 0.967
  on the project's own scenes. Served at 128 the same weights had 0.875, at 160 0.926.
  Before it: the bundle trained on the plain generator (commit 85dc593) 0.629 (0.909 on
  our own scenes); `recipes.DETECT_TRUNK` (broad images only, 96-pixel tiles) 0.688
  (0.70); that with a quarter of the scenes plain, fitted to a 128-pixel short side, 0.715
  (0.726); this recipe without the auxiliary losses (12000 steps) 0.824 (0.826) served at
  192 and 0.752 at 128, its per-pixel calls mixing squares and triangles inside one shape
  (corners of squares called triangle and the reverse); two blocks in every stage
  instead, without them, 0.527 (not converged).

The recipes are in `recipes`, the batches in `data`, the models in `models`, the loops in
`training` and the bundle building in `bundles`; this module is the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hornet_bundle import Manifest
from model_export.demo.bundles import BUNDLES, DEFAULT_OUT, build_bundle
from model_export.demo.models import build_segmenter
from model_export.demo.recipes import THREADS, Recipe
from model_export.demo.training import train_segmenter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundles root")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BUNDLES),
        help="build these bundles only (detect starts from the trunk of the segmenter of "
        "recipes.DETECT_TRUNK, trained first unless --segmenter-state has it)",
    )
    parser.add_argument(
        "--segmenter-state",
        type=Path,
        help="the weights of the detector's trunk segmenter (recipes.DETECT_TRUNK): loaded "
        "from here (weights only) when the file exists, else saved here once trained, so "
        "that it is trained once for several runs",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    # (recipe, model) of each model trained in this run (recipes hold dicts: no hashing).
    trained: list[tuple[Recipe, torch.nn.Module]] = []
    for task in [t for t in BUNDLES if args.only is None or t in args.only]:
        bundle = BUNDLES[task]
        trunk = None
        if bundle.trunk is not None:
            # Single-threaded training repeats exactly: whether trained in this run, loaded
            # or trained again here, this is the shipped detector's trunk.
            same = [model for recipe, model in trained if recipe == bundle.trunk]
            if not same:
                same = [_segmenter(bundle.trunk, args.segmenter_state)]
                trained.append((bundle.trunk, same[0]))
            trunk = same[0].backbone
        manifest, model = build_bundle(bundle, args.out, trunk)
        trained.append((bundle.recipe, model))
        _report(args.out, manifest)


def _segmenter(recipe: Recipe, state: Path | None) -> torch.nn.Module:
    if state is not None and state.exists():
        model = build_segmenter(recipe)
        model.load_state_dict(torch.load(state, weights_only=True))
        return model.eval()
    model = train_segmenter(recipe).model
    if state is not None:
        torch.save(model.state_dict(), state)
    return model


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
