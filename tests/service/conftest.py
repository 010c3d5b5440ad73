"""Fixtures: test bundles on disk, apps with their lifespan running, real photos."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import bundles  # noqa: E402

from service.app import create_app  # noqa: E402
from service.engines import create_engine  # noqa: E402
from service.settings import Settings  # noqa: E402

TEST_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _no_hang():
    """A test stuck past TEST_TIMEOUT_S dumps every thread's stack and ends the run,
    instead of hanging it silently (the tests bound their own waits much tighter)."""
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundles.write_classifier(tmp_path_factory.mktemp("bundles") / "tiny_cls")


@pytest.fixture(scope="session")
def host_normalised_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundles.write_classifier(
        tmp_path_factory.mktemp("bundles") / "tiny_cls_nchw",
        name="tiny_cls_nchw",
        normalize_in_graph=False,
    )


@pytest.fixture(scope="session")
def segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundles.write_segmenter(tmp_path_factory.mktemp("bundles") / "tiny_seg")


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundles.write_detector(tmp_path_factory.mktemp("bundles") / "tiny_det")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image, in several aspect ratios."""
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
        "portrait": np.ascontiguousarray(data.coffee().transpose(1, 0, 2)),
    }


def encode(array: np.ndarray | Image.Image, fmt: str = "PNG", **options) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


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
                await wait_until_ready(client)
            yield client


async def wait_until_ready(client: httpx.AsyncClient, timeout_s: float = 20.0) -> None:
    import anyio

    with anyio.fail_after(timeout_s):
        while (await client.get("/readyz")).status_code != 200:
            if client.app.state.pool.load_error:
                raise AssertionError(client.app.state.pool.load_error)
            await anyio.sleep(0.01)


def upload(*images: bytes, content_type: str = "image/png") -> list[tuple[str, tuple]]:
    """Multipart `file` fields, one per image, in order."""
    return [("file", (f"image{i}.png", data, content_type)) for i, data in enumerate(images)]


class InstrumentedEngine:
    """A real engine that records batch sizes and can be slowed down or made to fail."""

    def __init__(self, inner, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.description = inner.description
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []
        self.fail = False

    def run(self, inputs):
        (batch,) = inputs.values()
        self.batch_sizes.append(int(batch.shape[0]))
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("engine failure injected by the test")
        return self.inner.run(inputs)

    def close(self) -> None:
        self.inner.close()


class InstrumentedFactory:
    """engine_factory building InstrumentedEngines; `gate` holds model loading back."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.engines: list[InstrumentedEngine] = []

    def __call__(self, bundle, settings) -> InstrumentedEngine:
        if self.gate is not None and not self.gate.wait(30):
            raise TimeoutError("the test never opened the loading gate")
        engine = InstrumentedEngine(create_engine(bundle, settings), self.delay_s)
        self.engines.append(engine)
        return engine

    @property
    def batch_sizes(self) -> list[int]:
        return [size for engine in self.engines for size in engine.batch_sizes]
