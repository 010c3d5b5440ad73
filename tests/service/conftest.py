"""Fixtures: test bundles on disk, real photos, and a bound on every test's time."""

from __future__ import annotations

import faulthandler
import typing
from pathlib import Path

import numpy as np
import pytest

from service.settings import Settings
from tests.helpers import bundles

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
def slow_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier whose engine takes about 45 ms per image on one thread: requests
    queue behind each other (bundles.write_slow_classifier)."""
    directory = tmp_path_factory.mktemp("bundles") / "slow_cls"
    return bundles.write_slow_classifier(directory, matmuls=40)


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


@pytest.fixture(params=typing.get_args(Settings.model_fields["http_parser"].annotation))
def http_parser(request) -> str:
    """Each HTTP parser the server offers (--http-parser)."""
    return request.param
