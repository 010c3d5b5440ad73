"""Label spaces of the released checkpoints, built from the synset and lemma lists that
timm ships (never hand-typed).

HorNet-L's ImageNet-22k head has 10459 outputs: the 10450 synsets of timm's
`imagenet21k_miil_w21_synsets.txt` in order, then nine ImageNet-1k synsets that list
lacks (HORNET_SPEC.md, "Label spaces").
"""

from __future__ import annotations

import csv
import pkgutil
from functools import cache

HORNET_22K_EXTRA_SYNSETS = (
    "n02085782", "n02089078", "n02089867", "n02089973", "n02091635",
    "n02108000", "n02112706", "n02113978", "n04399382",
)  # fmt: skip
HORNET_22K_CLASSES = 10459


def _timm_info(filename: str) -> str:
    data = pkgutil.get_data("timm.data", f"_info/{filename}")
    if data is None:
        raise FileNotFoundError(f"timm does not ship _info/{filename}")
    return data.decode("utf-8")


@cache
def imagenet1k_synsets() -> tuple[str, ...]:
    return tuple(_timm_info("imagenet_synsets.txt").split())


@cache
def hornet22k_synsets() -> tuple[str, ...]:
    synsets = tuple(_timm_info("imagenet21k_miil_w21_synsets.txt").split())
    missing = [s for s in HORNET_22K_EXTRA_SYNSETS if s in synsets]
    if missing:
        raise ValueError(f"timm's w21 synset list already holds {missing}; label space changed")
    synsets += HORNET_22K_EXTRA_SYNSETS
    if len(synsets) != HORNET_22K_CLASSES:
        raise ValueError(f"HorNet-22k label space has {len(synsets)} synsets, expected 10459")
    return synsets


@cache
def _lemmas() -> dict[str, str]:
    rows = csv.reader(_timm_info("imagenet_synset_to_lemma.txt").splitlines(), delimiter="\t")
    return dict(rows)


def lemmas(synsets: tuple[str, ...]) -> list[str]:
    """Human-readable names (WordNet lemmas, e.g. 'tench, Tinca tinca') of `synsets`."""
    table = _lemmas()
    return [table[s] for s in synsets]


@cache
def in1k_rows_of_22k_head() -> tuple[int, ...]:
    """For each ImageNet-1k class in order, its row in the 10459-way HorNet-22k head."""
    index = {s: i for i, s in enumerate(hornet22k_synsets())}
    return tuple(index[s] for s in imagenet1k_synsets())


@cache
def ade20k_classes() -> tuple[str, ...]:
    """ADE20K's 150 classes, vendored from mmsegmentation (see the file's header)."""
    data = pkgutil.get_data("model_export", "data/ade20k_classes.txt")
    if data is None:
        raise FileNotFoundError("model_export/data/ade20k_classes.txt is missing")
    return tuple(line for line in data.decode("utf-8").splitlines() if not line.startswith("#"))


@cache
def coco_classes() -> tuple[str, ...]:
    """COCO's 80 detection classes from torchvision's weight metadata ('N/A' gaps and
    '__background__' dropped)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    categories = MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    return tuple(c for c in categories if c not in ("N/A", "__background__"))


# Each entry returns the list of label names of a label set, in output-index order.
LABEL_SETS = {
    "imagenet-1k": lambda: lemmas(imagenet1k_synsets()),
    "hornet-22k": lambda: lemmas(hornet22k_synsets()),
    "ade20k": lambda: list(ade20k_classes()),
    "coco": lambda: list(coco_classes()),
}


def labels_for(label_set: str | None, num_classes: int) -> list[str]:
    """Label names for a model's outputs; `class{i}` names when the set is unknown."""
    if label_set is None:
        return [f"class{i}" for i in range(num_classes)]
    if label_set not in LABEL_SETS:
        raise KeyError(f"unknown label set {label_set!r}; known: {sorted(LABEL_SETS)}")
    names = LABEL_SETS[label_set]()
    if len(names) != num_classes:
        raise ValueError(
            f"label set {label_set!r} has {len(names)} names for {num_classes} outputs"
        )
    return names
