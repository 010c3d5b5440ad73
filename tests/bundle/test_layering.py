"""The layering rule: the bundle contract depends on neither half, the service never
imports the exporter, and the exporter takes only the contract from the service side."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Imports of `service` the exporter still makes, each with the reason and what ends it.
EXPORTER_USES_OF_SERVICE = {
    # The demo models train on the service's own preprocessing (so they see what the
    # served graph sees); goes when the demo builder is split from model_export.
    ("model_export/demo/train.py", "service"),
}
CONTRACT_MAY_IMPORT = {"pydantic", "hornet_bundle"}


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


def test_the_exporter_imports_only_the_contract_from_the_service_side() -> None:
    uses = {(f, m) for f, m in _top_level("model_export") if m == "service"}
    assert uses <= EXPORTER_USES_OF_SERVICE, sorted(uses - EXPORTER_USES_OF_SERVICE)


@pytest.mark.parametrize("half", ["service", "model_export"])
def test_the_contract_imports_neither_half(half: str) -> None:
    assert [(f, m) for f, m in _top_level("hornet_bundle") if m == half] == []


def test_the_contract_needs_only_pydantic_and_the_standard_library() -> None:
    outside = {
        (f, m)
        for f, m in _top_level("hornet_bundle")
        if m not in CONTRACT_MAY_IMPORT and m not in sys.stdlib_module_names
    }
    assert outside == set()
