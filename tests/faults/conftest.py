"""Fault campaigns share one FLEET_HOME with two trained versions of a small model."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings


@pytest.fixture(scope="session")
def fault_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits v1 and v2 (fp32 ONNX, ~69 KB each): the update the campaigns interrupt."""
    h = tmp_path_factory.mktemp("faults") / "home"
    client = LocalClient(load_settings(home=h))
    client.init()
    for seed in (0, 1):
        client.train(
            "digits",
            "digits",
            arch="mlp",
            epochs=1,
            seed=seed,
            batch_size=64,
            lr=3e-3,
            on_epoch=None,
        )
    client.close()
    return h
