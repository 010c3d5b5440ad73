"""Engines other packages register under `hornet.engines`: the export side's `torch`."""

from __future__ import annotations

from importlib import metadata

import pytest

from hornet_bundle import ENGINE_ENTRY_POINTS, EngineUnavailable
from service.engines import registered_engine


def test_the_torch_engine_is_registered_by_the_export_side() -> None:
    (entry_point,) = metadata.entry_points(group=ENGINE_ENTRY_POINTS, name="torch")
    assert entry_point.value == "model_export.torch_engine:TorchEngine"


def test_an_engine_nobody_registered_is_refused_naming_the_entry_point_group() -> None:
    with pytest.raises(EngineUnavailable, match="'hornet.engines' entry point named 'nope'"):
        registered_engine("nope")
