"""One of each: the variant catalogue, the version string, the backoff, process trees."""

from __future__ import annotations

import random
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import edgefleet
from edgefleet.agent import agent as agent_mod
from edgefleet.agent import slots, updater
from edgefleet.cloud import client, quantize, variants
from edgefleet.protos import variants as catalogue
from edgefleet.protos.backoff import Backoff
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.flower import FlowerProcess, descendants
from edgefleet.protos.manifest import RUNTIMES


def test_one_variant_catalogue_for_both_sides() -> None:
    assert variants.KINDS is catalogue.KINDS
    assert updater.KNOWN_VARIANTS == catalogue.NAMES
    assert slots.EXTENSIONS is catalogue.EXTENSIONS
    # every variant but the export itself has exactly one builder
    assert set(quantize.BUILDERS) == set(catalogue.NAMES) - {"fp32"}
    assert {k.runtime for k in catalogue.KINDS.values()} <= set(RUNTIMES)
    assert catalogue.EXTENSIONS == {"onnxruntime": "onnx", "litert": "tflite"}
    with pytest.raises(InvalidArgument, match=r"variant 'int3' unknown; accepted: fp32, int8"):
        catalogue.kind("int3")


def test_one_version_string_from_package_metadata() -> None:
    assert edgefleet.__version__ == agent_mod.AGENT_VERSION
    assert client.coordinator_version() == edgefleet.__version__
    assert edgefleet.__version__ != ""


@pytest.mark.parametrize(("base", "cap"), [(0.5, 30.0), (1.0, 60.0), (0.01, 0.5)])
def test_backoff_is_capped_exponential_with_full_jitter(base: float, cap: float) -> None:
    rng = random.Random(7)
    b = Backoff(base, cap)
    for attempt in range(1, 40):
        upper = min(cap, base * 2 ** (attempt - 1))
        draws = [b.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= upper for d in draws)
        # full jitter: spread over the whole range, not bunched at the top
        assert min(draws) < upper * 0.1 and max(draws) > upper * 0.9
    assert b.delay(0, rng) <= base  # attempt 0 counts as the first


def test_flower_process_stops_its_whole_tree(tmp_path: Path) -> None:
    """A child that starts a grandchild in its own session (as Flower does): stop() ends both."""
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
        time.sleep(600)
        """
    )
    proc = FlowerProcess(
        [sys.executable, "-c", script], env={"PATH": "/usr/bin:/bin"}, log_path=tmp_path / "l.log"
    )
    proc.start()
    assert proc.pid is not None
    parent = psutil.Process(proc.pid)
    tree: list[psutil.Process] = []
    for _ in range(400):  # the grandchild appears once the child's Python is up
        tree = descendants(proc.pid)
        if tree:
            break
        time.sleep(0.05)
    (grandchild,) = tree
    assert grandchild.pid != proc.pid
    proc.stop(timeout=10)
    assert not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE
    _, alive = psutil.wait_procs([grandchild], timeout=10)
    assert alive == []
