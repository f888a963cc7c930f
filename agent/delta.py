"""Device side of model deltas: find the base a delta names among the installed models
(active or last-known-good, checked against its digest), rebuild the artifact, check it
against the signed manifest and write it where `ModelSlots.install` expects it.

The decoders (zstandard, bsdiff4) are imported only when a delta is applied. Every
failure here is a reason to download the full artifact instead, never to stop: the
updater reports `DELTA_NO_BASE` or `DELTA_FAILED` and carries on.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from edgefleet.agent.download import fsync_dir
from edgefleet.agent.slots import InstalledModel, ModelSlots
from edgefleet.protos.delta import apply_delta
from edgefleet.protos.errors import DataLoss
from edgefleet.protos.manifest import Manifest, check_artifact

logger = logging.getLogger(__name__)


def find_base(slots: ModelSlots, sha256: str) -> InstalledModel | None:
    """The active or last-known-good model whose artifact is `sha256`, if either is."""
    for inst in (slots.active(), slots.last_known_good()):
        if inst is not None and inst.sha256 == sha256:
            return inst
    return None


def rebuild(base: InstalledModel, delta_path: Path, manifest: Manifest, dest: Path) -> Path:
    """Apply the delta at `delta_path` to `base`'s bytes and write the result to `dest`
    (flushed), after checking it is exactly the manifest's artifact. The delta file is
    removed either way. Raises `DataLoss` (base on disk damaged, or the result is not
    the artifact) or `InvalidArgument` (the delta is malformed or for another base)."""
    try:
        base_bytes = base.path.read_bytes()
        actual = hashlib.sha256(base_bytes).hexdigest()
        if actual != base.sha256:
            raise DataLoss(
                f"delta base {base.sha256[:16]}… on disk ({base.path}) now hashes to {actual[:16]}…"
            )
        out = apply_delta(base_bytes, delta_path.read_bytes())
        check_artifact(manifest, out)
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
