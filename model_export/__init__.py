"""HorNet model zoo and export stage (needs torch).

`create_model` and `list_variants` are imported lazily so that `model_export.cli`
(the `hornet` command, whose `serve` subcommand must run without torch) stays light.
"""

from __future__ import annotations

__all__ = ["create_model", "list_variants", "get_variant"]


def __getattr__(name: str):
    if name in __all__:
        from model_export import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'model_export' has no attribute {name!r}")
