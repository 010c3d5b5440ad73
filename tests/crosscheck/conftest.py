"""Fixtures shared by the cross-checks against the official OpenMMLab code."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scikit-image's photographs as PNG files (mmseg and mmdet read files)."""
    from skimage import data

    out = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in PHOTOS:
        paths[name] = out / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(paths[name])
    return paths
