"""Device side of model deltas: find the base a delta names among the installed models
(active or last-known-good, checked against its digest), rebuild the artifact, check it
against the signed manifest and write it where `ModelSlots.install` expects it.

The decoders (zstandard, bsdiff4) are imported only when a delta is applied. Every
failure here is a reason to download the full artifact instead, never to stop: the
updater reports `DELTA_NO_BASE` or `DELTA_FAILED` and carries on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from edgefleet.agent.download import fsync_dir
from edgefleet.agent.slots import InstalledModel, ModelSlots
from edgefleet.protos.delta import apply_delta, read_header
from edgefleet.protos.errors import DataLoss
from edgefleet.protos.manifest import Manifest

logger = logging.getLogger(__name__)

#: what the agent adds to `Capabilities.features` when it can apply deltas; the
#: coordinator offers deltas only to devices that list it
FEATURE = "delta"


def available() -> bool:
    """Whether this install can apply every delta format (the `[delta]` extra), found
    without importing the decoders."""
    return all(importlib.util.find_spec(m) is not None for m in ("zstandard", "bsdiff4"))


def find_base(slots: ModelSlots, sha256: str) -> InstalledModel | None:
    """The active or last-known-good model whose artifact is `sha256`, if either is."""
    for inst in (slots.active(), slots.last_known_good()):
        if inst is not None and inst.sha256 == sha256:
            return inst
    return None


def rebuild(base: InstalledModel, delta_path: Path, manifest: Manifest, dest: Path) -> Path:
    """Apply the delta at `delta_path` to `base`'s bytes and write the result to `dest`
    (flushed), after checking it is exactly the manifest's artifact (the delta's header
    names the manifest's digest and size, and the rebuilt bytes hash to it). The delta
    file is removed either way. Raises `DataLoss` (base on disk damaged, or the result is not
    the artifact) or `InvalidArgument` (the delta is malformed or for another base)."""
    try:
        delta = delta_path.read_bytes()
        h = read_header(delta)
        if (h.target_sha256, h.target_size) != (manifest.sha256, manifest.size):
            raise DataLoss(
                f"delta rebuilds {h.target_sha256[:16]}… ({h.target_size} bytes); the manifest "
                f"of {manifest.ref} names {manifest.sha256[:16]}… ({manifest.size} bytes)"
            )
        # the base is not hashed: damaged base bytes give a result that fails the
        # target digest check in apply_delta (one hash, not three)
        out = apply_delta(base.path.read_bytes(), delta, base_sha256=base.sha256)
    finally:
        delta_path.unlink(missing_ok=True)
    tmp = dest.with_name(dest.name + ".delta-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(out)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    logger.debug("rebuilt %s from %s via delta", manifest.ref, base.sha256[:12])
    return dest
