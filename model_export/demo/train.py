"""Train the three demo models on synthetic shapes and export them as demo bundles.

    python -m model_export.demo.train [--out service/demo_bundles] [--only TASK ...]

Each model is a tiny configuration of a real variant (HorNet-GF classifier, UperNet with
a HorFPN head, Mask R-CNN with a HorFPN neck) trained on this CPU, one thread. The
segmenter trains from scratch and its trunk starts the detector and the classifier
(from scratch the tiny GF classifier learned slowly and unevenly: 0.94 accuracy after
3000 steps, 0.77 after 4500 at a higher learning rate; from the segmenter's trunk, 0.975
after 3000 of its 4000 steps). Training data goes through the served preprocessing
(`hornet_bundle.preprocess`), so the models see what the served graph sees. Every random
draw is seeded (single-threaded runs repeat exactly); the seeds and this command are
recorded in each bundle's manifest (`export.demo_training`).

Training images are repainted with broad appearance (`appearance`: textures and photos,
lower contrast, anti-aliased edges, blur, noise, JPEG) and the classifier resizes whole
images ("direct"). The bundles shipped in service/demo_bundles predate both: they were
trained on the plain generator (this command as of commit 85dc593 rebuilds them).
The full recipes with broad appearance, run on 2026-12-01 (`python -m tests.demo.
generalisation` on the second renderer, 150 images and 60 scenes), did not beat them:
the segmenter (6000 steps, 38 min) reached mean IoU 0.583 (shipped 0.629: background
0.989, circle 0.615, square 0.342, triangle 0.385); the detector from its trunk (2000
steps, 36 min) recall 0.994 with 40% of detections at score >= 0.5 false (shipped 0.976
and 54%) but drew duplicate boxes of the wrong class on the generator's own scenes; the
classifier (96 px) stayed at chance loss (1.07 after 500 steps; 64 px did the same). The
tiny networks or these schedules are short of what the broad images need.

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
from model_export.demo.recipes import THREADS
from model_export.demo.training import train_segmenter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundles root")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BUNDLES),
        help="build these bundles only (detect starts from the segmenter's trunk: it is "
        "trained first unless segment is built in the same run)",
    )
    parser.add_argument(
        "--segmenter-state",
        type=Path,
        help="the segmenter's weights: saved here when it is trained in this run, loaded "
        "from here (weights only) instead of training it again when detect is built "
        "alone, so the two can train in separate processes",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    tasks = [t for t in BUNDLES if args.only is None or t in args.only]
    segmenter = None
    for task in tasks:
        trunk = None
        if task == "detect":
            # Single-threaded training repeats exactly, so this is the shipped segmenter's
            # trunk whether it was trained in this run or is trained again here.
            segmenter = segmenter or _segmenter(args.segmenter_state)
            trunk = segmenter.backbone
        manifest, model = build_bundle(BUNDLES[task], args.out, trunk)
        if task == "segment":
            segmenter = model
            if args.segmenter_state is not None:
                torch.save(model.state_dict(), args.segmenter_state)
        _report(args.out, manifest)


def _segmenter(state: Path | None) -> torch.nn.Module:
    if state is None or not state.exists():
        return train_segmenter().model
    model = build_segmenter()
    model.load_state_dict(torch.load(state, weights_only=True))
    return model.eval()


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
