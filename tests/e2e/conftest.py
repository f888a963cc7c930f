"""Shared end-to-end fixtures: trained FLEET_HOMEs (the helpers are in tests/support/e2e.py:
`local_coordinator`, `wait_online`, `wait_born`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.e2e import Version, trained_home

#: make_home(name, *versions): a new trained FLEET_HOME in its own temporary folder
MakeHome = Callable[..., Path]


@pytest.fixture(scope="session")
def make_home(tmp_path_factory: pytest.TempPathFactory) -> MakeHome:
    """Module fixtures call it once: ``make_home("deploy", Version(epochs=5, ...))``."""

    def make(name: str, *versions: Version) -> Path:
        return trained_home(tmp_path_factory.mktemp(name), *versions)

    return make
