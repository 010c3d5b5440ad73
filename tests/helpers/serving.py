"""The app in process: its lifespan running, an HTTP client speaking to it over ASGI."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx

from service.app import create_app
from service.settings import Settings


def test_settings(model_dirs: list[Path], **overrides) -> Settings:
    values = dict(model_dir=model_dirs, engine_threads=1, max_delay_ms=2.0)
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # a helper, not a test


@contextlib.asynccontextmanager
async def serving(
    model_dirs: list[Path],
    *,
    engine_factory: Callable | None = None,
    wait_ready: bool = True,
    ready_timeout_s: float = 20.0,
    **overrides,
) -> AsyncIterator[httpx.AsyncClient]:
    """An app over `model_dirs` with its lifespan running, and a client speaking HTTP to it."""
    extra = {} if engine_factory is None else {"engine_factory": engine_factory}
    app = create_app(test_settings(model_dirs, **overrides), **extra)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app
            if wait_ready:
                await wait_until_ready(client, ready_timeout_s)
            yield client


async def wait_until_ready(client: httpx.AsyncClient, timeout_s: float = 20.0) -> None:
    with anyio.fail_after(timeout_s):
        while (await client.get("/readyz")).status_code != 200:
            if client.app.state.pool.load_error:
                raise AssertionError(client.app.state.pool.load_error)
            await anyio.sleep(0.01)
