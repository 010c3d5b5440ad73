"""The layering rule: the bundle contract depends on neither half and neither half imports
the other; what both need (the manifest, the preprocess transforms) is in the contract."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_MAY_IMPORT = {"pydantic", "hornet_bundle"}
# The transforms of the manifest's `preprocess` need the service's core image libraries;
# the rest of the contract does not load them.
TRANSFORMS = "hornet_bundle/preprocess.py"
TRANSFORMS_MAY_IMPORT = CONTRACT_MAY_IMPORT | {"numpy", "PIL", "cv2"}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (anywhere, lazily too), but type-checking-only ones."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for stmt in node.body
        for child in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _top_level(package: str) -> list[tuple[str, str]]:
    """(file relative to the repository, top-level package imported) for `package`."""
    return sorted(
        (str(path.relative_to(ROOT)), module.split(".")[0])
        for path in (ROOT / package).rglob("*.py")
        for module in _imports(path)
    )


def test_the_service_never_imports_the_exporter() -> None:
    assert [(f, m) for f, m in _top_level("service") if m == "model_export"] == []


def test_the_exporter_never_imports_the_service() -> None:
    assert [(f, m) for f, m in _top_level("model_export") if m == "service"] == []


@pytest.mark.parametrize("half", ["service", "model_export"])
def test_the_contract_imports_neither_half(half: str) -> None:
    assert [(f, m) for f, m in _top_level("hornet_bundle") if m == half] == []


def test_the_contract_needs_only_pydantic_and_the_standard_library() -> None:
    outside = {
        (f, m)
        for f, m in _top_level("hornet_bundle")
        if f != TRANSFORMS and m not in CONTRACT_MAY_IMPORT and m not in sys.stdlib_module_names
    }
    assert outside == set()


def test_the_preprocess_transforms_need_only_the_services_image_libraries() -> None:
    outside = {
        (f, m)
        for f, m in _top_level("hornet_bundle")
        if f == TRANSFORMS and m not in TRANSFORMS_MAY_IMPORT and m not in sys.stdlib_module_names
    }
    assert outside == set()


def test_the_rest_of_the_contract_never_loads_the_preprocess_transforms() -> None:
    loaders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "hornet_bundle").rglob("*.py")
        if "hornet_bundle.preprocess" in _imports(path)
    ]
    assert loaders == []
