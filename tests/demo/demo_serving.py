"""The demo bundles: where they ship, and the real app serving them over HTTP."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import numpy as np
from PIL import Image

import service
from service.app import create_app
from service.settings import Settings

DEMO_BUNDLES = Path(service.__file__).parent / "demo_bundles"
DEMO_NAMES = {"classify": "shapes_classify", "segment": "shapes_segment", "detect": "shapes_detect"}


def bundle_dir(task: str) -> Path:
    return DEMO_BUNDLES / DEMO_NAMES[task]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def uploads(images: list[np.ndarray]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Repeated multipart 'file' fields, one per image, in order."""
    return [("file", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images)]


@contextlib.asynccontextmanager
async def serving(*tasks: str) -> AsyncIterator[httpx.AsyncClient]:
    """The real app over the shipped demo bundles of `tasks`, lifespan running, ready."""
    settings = Settings(
        model_dir=[bundle_dir(t) for t in tasks], engine_threads=1, max_delay_ms=2.0
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://demo", timeout=120.0
        ) as client:
            with anyio.fail_after(60):
                while (await client.get("/readyz")).status_code != 200:
                    if app.state.pool.load_error:
                        raise AssertionError(app.state.pool.load_error)
                    await anyio.sleep(0.02)
            yield client
