"""Offline installs: a model given to a device by hand (`fleet-agent install`), for a
device with no broker in reach.

The checks are the ones an update over MQTT goes through, by the same code: the
manifest's signature against the keys the device trusts (`load_trust` +
`verify_manifest_trusted`, as `Updater._verify_manifest`), its variant and runtime,
the artifact's size and sha256 (`check_artifact`), a load with the golden self-test
(`inference.load`); then the same slots (`ModelSlots.install` + `activate`), so the
model that served before becomes last-known-good. Every check runs before anything
is written: refused input leaves the state directory as it was.

The agent and an install never share a state directory: each holds an exclusive
`flock` on the directory itself while it works (nothing is created for it), and the
install refuses with `Conflict` while a running agent holds it. The lock goes with
the process, so a killed agent leaves none behind.

Run as root for a service running as its own user, what the install wrote is given to
the state directory's owner. After an install, ``STATE_DIR/offline-install.json``
records it; the agent reports
the model active with reason ``OFFLINE_INSTALL`` the next time it connects, then
removes the record (`pending_report`, `clear_report`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.config import AgentSettings
from edgefleet.agent.download import fsync_dir
from edgefleet.agent.keys import load_trust
from edgefleet.agent.slots import EXTENSIONS, ModelSlots
from edgefleet.protos.errors import (
    Conflict,
    DataLoss,
    FleetError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from edgefleet.protos.keys import verify_manifest_trusted
from edgefleet.protos.manifest import Manifest, SignedManifest, check_artifact
from edgefleet.protos.variants import NAMES as KNOWN_VARIANTS

logger = logging.getLogger(__name__)

RECORD_FILE = "offline-install.json"
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class OfflineInstall:
    """What `install` did."""

    ref: str
    sha256: str
    previous: str | None  # sha256 of the model that served before (now last-known-good)
    self_test_diff: float


@contextmanager
def state_lock(state_dir: Path, *, holder: str) -> Iterator[int]:
    """Hold the state directory exclusively; `Conflict` if another process holds it.
    Yields the locked descriptor (an agent switching versions unlocks and relocks it)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(
                f"state directory {state_dir} is held by another process (a running agent?); "
                f"stop it first (systemctl stop edgefleet-agent) to run {holder}"
            ) from None
        yield fd
    finally:
        os.close(fd)  # releases the lock


def install(
    settings: AgentSettings,
    artifact: Path,
    manifest_path: Path,
    *,
    runtimes: Sequence[str],
    providers: Sequence[str],
    source: str = "",
) -> OfflineInstall:
    """Verify `artifact` against the signed manifest at `manifest_path` and make it the
    active model in ``settings.state_dir``. Raises a `FleetError` whose message names
    the file and the check that failed; on any error nothing under the state
    directory has changed."""
    from edgefleet.agent.inference import load

    state_dir = settings.state_dir
    with state_lock(state_dir, holder="fleet-agent install"):
        signed_bytes = _read(manifest_path, "manifest", limit=MAX_MANIFEST_BYTES)
        manifest = _verify(settings, signed_bytes, manifest_path)
        _check_runs_here(manifest, manifest_path, runtimes)
        data = _read(artifact, "artifact")
        try:
            check_artifact(manifest, data)
        except DataLoss as e:
            raise DataLoss(f"artifact {artifact}: digest check failed: {e}") from None
        try:
            model = load(manifest, data, providers=providers, threads=settings.inference_threads)
        except FleetError as e:
            raise type(e)(f"artifact {artifact}: self-test failed: {e}") from None
        diff = model.self_test_diff
        del model
        # checked: from here on, the same steps as an update over MQTT
        slots = ModelSlots(state_dir)
        previous = slots.active()
        ext = EXTENSIONS[manifest.runtime]
        dest = slots.artifact_path(manifest.sha256, extension=ext)
        tmp = dest.with_name(dest.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        slots.install(signed_bytes, tmp, extension=ext)
        slots.activate(manifest.sha256, slots.generation)
        slots.gc()
        record = {
            "sha256": manifest.sha256,
            "ref": str(manifest.ref),
            "source": source or str(artifact),
            "installed_at_ms": int(time.time() * 1000),
        }
        _write_record(state_dir, record)
        _give_to_owner(state_dir)
        logger.info("installed %s offline from %s", manifest.ref, artifact)
        return OfflineInstall(
            str(manifest.ref),
            manifest.sha256,
            previous.sha256 if previous else None,
            diff,
        )


def pending_report(state_dir: Path) -> dict[str, object] | None:
    """The offline install not yet reported to the coordinator, if any."""
    try:
        doc = json.loads((state_dir / RECORD_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("offline install record unreadable (%s); reporting it without detail", e)
        return {}
    return doc if isinstance(doc, dict) else {}


def clear_report(state_dir: Path) -> None:
    (state_dir / RECORD_FILE).unlink(missing_ok=True)


def _verify(settings: AgentSettings, signed_bytes: bytes, path: Path) -> Manifest:
    trust = load_trust(
        state_dir=settings.state_dir,
        public_key_pem=settings.public_key_pem,
        root_public_key_pem=settings.root_public_key_pem,
        key_list_b64=settings.key_list,
    )
    try:
        return verify_manifest_trusted(SignedManifest.from_bytes(signed_bytes), trust)
    except Unauthenticated as e:
        raise Unauthenticated(f"manifest {path}: signature check failed: {e}") from None
    except InvalidArgument as e:
        raise InvalidArgument(f"manifest {path}: not a signed manifest: {e}") from None


def _check_runs_here(manifest: Manifest, path: Path, runtimes: Sequence[str]) -> None:
    if manifest.variant not in KNOWN_VARIANTS:
        raise InvalidArgument(
            f"manifest {path}: variant {manifest.variant!r} unknown; this agent runs "
            f"{', '.join(KNOWN_VARIANTS)}"
        )
    if manifest.runtime not in runtimes:
        raise Unavailable(
            f"manifest {path}: {manifest.ref} needs {manifest.runtime}; this device has "
            f"{', '.join(runtimes) or 'no runtime'}"
        )


def _read(path: Path, what: str, *, limit: int = 0) -> bytes:
    try:
        if limit and path.stat().st_size > limit:
            raise InvalidArgument(f"{what} {path} is larger than {limit} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{what} {path} is a directory, not a file") from None


def _give_to_owner(state_dir: Path) -> None:
    """Run as root (`sudo fleet-agent install`) for a service running as its own user:
    what the install wrote goes to the state directory's owner, or the agent could not
    replace it later."""
    if os.geteuid() != 0:
        return
    st = state_dir.stat()
    models = state_dir / "models"
    written = [models, *models.iterdir()]
    written += [state_dir / n for n in ("slots.json", "slots.json.bak", RECORD_FILE)]
    for path in written:
        if path.exists() and (path.stat().st_uid, path.stat().st_gid) != (st.st_uid, st.st_gid):
            os.chown(path, st.st_uid, st.st_gid)


def _write_record(state_dir: Path, record: dict[str, object]) -> None:
    path = state_dir / RECORD_FILE
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(state_dir)
