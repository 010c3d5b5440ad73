"""Fixtures for the deployment checks; a missing tool or module skips with its reason."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.helpers.deploy_checks import (
    Cli,
    load_cli,
    load_settings_class,
    render,
    setting_env_names,
)


def _or_skip(loaded):
    if isinstance(loaded, str):
        pytest.skip(loaded)
    return loaded


@pytest.fixture(scope="session")
def cli() -> Cli:
    return _or_skip(load_cli())


@pytest.fixture(scope="session")
def settings_class() -> type:
    return _or_skip(load_settings_class())


@pytest.fixture(scope="session")
def env_names(settings_class: type) -> set[str]:
    """The HORNET_* variables `hornet serve` reads."""
    return setting_env_names(settings_class)


@pytest.fixture(scope="session")
def rendered() -> Callable[[str], list[dict]]:
    """`rendered("overlays/gpu")`: the objects `kubectl apply -k k8s/overlays/gpu` sends."""
    return lambda kustomization: _or_skip(render(kustomization))
