"""The demo bundles: where they ship, and the real app serving them in process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np

import service
from tests.helpers.images import encode, upload
from tests.helpers.serving import serving

DEMO_BUNDLES = Path(service.__file__).parent / "demo_bundles"
DEMO_NAMES = {"classify": "shapes_classify", "segment": "shapes_segment", "detect": "shapes_detect"}


def bundle_dir(task: str) -> Path:
    return DEMO_BUNDLES / DEMO_NAMES[task]


def uploads(images: list[np.ndarray]) -> list[tuple[str, tuple]]:
    """Repeated multipart 'file' fields, one PNG per image, in order."""
    return upload(*(encode(image) for image in images))


@contextlib.asynccontextmanager
async def serving_demo(*tasks: str) -> AsyncIterator[httpx.AsyncClient]:
    """The real app over the shipped demo bundles of `tasks`, lifespan running, ready."""
    async with serving([bundle_dir(t) for t in tasks], ready_timeout_s=60) as client:
        yield client
