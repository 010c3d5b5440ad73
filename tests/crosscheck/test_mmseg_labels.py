"""Our vendored ADE20K class names are mmseg's, read from the mmseg installed in the
OpenMMLab environment (its file is parsed, not imported)."""

from __future__ import annotations

import ast

from model_export.labels import labels_for
from tests.crosscheck.mm_env import site_packages


def _class_tuple(source: str, class_name: str) -> list[str]:
    tree = ast.parse(source)
    dataset = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == class_name
    )
    classes = next(
        node.value
        for node in dataset.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CLASSES"
    )
    return list(ast.literal_eval(classes))


def test_ade20k_names_equal_mmsegs() -> None:
    source = (site_packages() / "mmseg" / "datasets" / "ade.py").read_text()
    assert labels_for("ade20k", 150) == _class_tuple(source, "ADE20KDataset")
