"""The device's installed models: `active` and `last_known_good`, both on disk.

Layout under ``root``::

    models/{sha256}.onnx | models/{sha256}.tflite   the artifact
    models/{sha256}.manifest                         its signed manifest (SignedManifest bytes)
    slots.json                                       {"active", "last_known_good", "generation"}
    slots.json.bak                                   a second copy of slots.json

Keeping the last-known-good model's artifact and signed manifest on disk lets
``ACTION_ROLLBACK`` reactivate it without a download (docs/protocol.md).

Durability: every file is written to a temporary name, flushed and renamed over
the old one (``os.replace``), then the directory is flushed. ``slots.json`` is
written twice per change, first as ``slots.json.bak`` and then as ``slots.json``,
so both hold the same state once a change returns. A crash between the two leaves
``slots.json`` with the state from before the change (the change never returned).
On start ``slots.json`` is read; if it is unreadable (truncated, corrupted by the
storage) the backup is used, logged as a warning, and ``slots.json`` is repaired
from it. If both are unreadable the device cannot know what it was serving and
`ModelSlots` raises `DataLoss` rather than silently starting empty; an operator
(or the agent's recovery path) moves the files aside. No ``slots.json`` and no
backup is a fresh device: no active model.

Not thread-safe: the updater owns one instance and serializes calls.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.download import fsync_dir
from edgefleet.protos.errors import Conflict, DataLoss, FleetError, InvalidArgument, NotFound
from edgefleet.protos.manifest import SignedManifest, decode_manifest
from edgefleet.protos.variants import EXTENSIONS

logger = logging.getLogger(__name__)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MANIFEST_SUFFIX = ".manifest"


@dataclass(frozen=True)
class InstalledModel:
    """A model on disk: its artifact and the signed manifest it was installed with."""

    sha256: str
    path: Path
    manifest_bytes: bytes


@dataclass(frozen=True)
class _State:
    active: str | None
    last_known_good: str | None
    generation: int

    def to_json(self) -> bytes:
        doc = {
            "active": self.active,
            "last_known_good": self.last_known_good,
            "generation": self.generation,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> _State:
        """Parse and validate; raises ValueError naming what is wrong."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError(f"top level is {type(doc).__name__}, not an object")
        slots: dict[str, str | None] = {}
        for key in ("active", "last_known_good"):
            value = doc.get(key)
            if value is not None and not (isinstance(value, str) and _SHA256_HEX.fullmatch(value)):
                raise ValueError(f"{key} is {value!r}; expected a sha256 hex digest or null")
            slots[key] = value
        generation = doc.get("generation")
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise ValueError(f"generation is {generation!r}; expected an integer >= 0")
        return cls(slots["active"], slots["last_known_good"], generation)


class ModelSlots:
    """Installed models under `root`: install, activate, roll back, collect garbage."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._models = root / "models"
        self._models.mkdir(parents=True, exist_ok=True)
        self._state_path = root / "slots.json"
        self._backup_path = root / "slots.json.bak"
        self._state = self._load()

    # -- reading --------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._root

    @property
    def generation(self) -> int:
        """The generation of the last activation or rollback (0 on a fresh device)."""
        return self._state.generation

    def active(self) -> InstalledModel | None:
        return self._installed(self._state.active, "active")

    def last_known_good(self) -> InstalledModel | None:
        return self._installed(self._state.last_known_good, "last-known-good")

    def installed(self, sha256: str) -> InstalledModel | None:
        """An installed model by digest (active, last-known-good or just installed)."""
        return self._installed(sha256, "installed")

    def has(self, sha256: str) -> bool:
        """True if both the artifact and the manifest of `sha256` are on disk."""
        return _SHA256_HEX.fullmatch(sha256) is not None and self._artifact(sha256) is not None

    def artifact_path(self, sha256: str, *, extension: str) -> Path:
        """Where `install` puts the artifact; a download may finish straight there."""
        _check_sha256(sha256)
        _check_extension(extension)
        return self._models / f"{sha256}.{extension}"

    # -- changing -------------------------------------------------------------------

    def install(self, manifest_bytes: bytes, artifact: Path, *, extension: str) -> InstalledModel:
        """Move a verified artifact into place with its signed manifest.

        `manifest_bytes` are `SignedManifest` bytes whose signature the caller has
        checked, and `artifact` the file the caller checked against it (e.g.
        `PartialDownload.finish`); here only its size is compared with the manifest.
        `extension` must fit the manifest's runtime (onnx for onnxruntime, tflite
        for litert). Does not activate. Installing a model already present replaces
        its files with the same bytes. Raises `InvalidArgument`, `DataLoss` (size),
        `NotFound` (no artifact file).
        """
        _check_extension(extension)
        try:
            manifest = decode_manifest(SignedManifest.from_bytes(manifest_bytes).manifest_bytes)
        except FleetError as e:
            raise InvalidArgument(f"cannot install: {e}") from e
        if not _SHA256_HEX.fullmatch(manifest.sha256):
            raise InvalidArgument(
                f"cannot install {manifest.ref}: manifest sha256 {manifest.sha256!r} is not "
                "64 lowercase hex characters"
            )
        expected_ext = EXTENSIONS.get(manifest.runtime)
        if extension != expected_ext:
            raise InvalidArgument(
                f"cannot install {manifest.ref}: extension {extension!r} does not fit runtime "
                f"{manifest.runtime}; expected {expected_ext!r}"
            )
        try:
            actual = artifact.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"cannot install {manifest.ref}: no artifact file {artifact}") from None
        if actual != manifest.size:
            raise DataLoss(
                f"cannot install {manifest.ref}: {artifact} is {actual} bytes; "
                f"manifest says {manifest.size}"
            )
        sha = manifest.sha256
        _write_atomic(self._models / f"{sha}{_MANIFEST_SUFFIX}", manifest_bytes)
        dest = self._models / f"{sha}.{extension}"
        if artifact.resolve() != dest.resolve():
            os.replace(artifact, dest)
        fsync_dir(self._models)
        logger.info("installed %s (%s) at %s", manifest.ref, sha[:16], dest)
        return InstalledModel(sha, dest, manifest_bytes)

    def activate(self, sha256: str, generation: int) -> InstalledModel:
        """Make an installed model active; the previous active one becomes
        last-known-good. Re-activating the active model only records `generation`.

        Raises `NotFound` if it is not installed, `Conflict` if `generation` is
        older than the recorded one.
        """
        _check_sha256(sha256)
        self._check_generation(generation)
        path = self._artifact(sha256)
        if path is None:
            raise NotFound(f"model {sha256[:16]}… is not installed; install it first")
        model = InstalledModel(
            sha256, path, (self._models / f"{sha256}{_MANIFEST_SUFFIX}").read_bytes()
        )
        s = self._state
        lkg = s.last_known_good if s.active in (None, sha256) else s.active
        self._save(_State(sha256, lkg, generation))
        logger.info(
            "activated %s at generation %d; last-known-good %s",
            sha256[:16],
            generation,
            lkg[:16] if lkg else None,
        )
        return model

    def rollback(self, *, generation: int | None = None) -> InstalledModel:
        """Reactivate the last-known-good model and return it.

        The model rolled back from is not kept as last-known-good (it is the one
        judged bad), so afterwards there is none until the next activation; `gc`
        may then delete it. `generation`, when given, is recorded (the rollback's
        desired generation); otherwise the recorded one is kept. Raises `NotFound`
        "no last-known-good model" when there is none or its files are gone.
        """
        if generation is not None:
            self._check_generation(generation)
        s = self._state
        if s.last_known_good is None:
            raise NotFound("no last-known-good model to roll back to")
        model = self._installed(s.last_known_good, "last-known-good")
        if model is None:
            raise NotFound(
                f"no last-known-good model: {s.last_known_good[:16]}… is missing from "
                f"{self._models}"
            )
        self._save(
            _State(s.last_known_good, None, s.generation if generation is None else generation)
        )
        logger.warning(
            "rolled back from %s to last-known-good %s",
            s.active[:16] if s.active else None,
            model.sha256[:16],
        )
        return model

    def gc(self) -> list[Path]:
        """Delete every file under models/ that belongs to neither the active nor the
        last-known-good model (installed-but-not-activated ones included, and left-
        over temporary files); return what was deleted."""
        keep = {s for s in (self._state.active, self._state.last_known_good) if s}
        removed: list[Path] = []
        for path in sorted(self._models.iterdir()):
            if path.is_dir():
                continue
            if path.name.split(".", 1)[0] in keep and not path.name.endswith(".tmp"):
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            fsync_dir(self._models)
            logger.info("removed %d unused model file(s) from %s", len(removed), self._models)
        return removed

    # -- internals ------------------------------------------------------------------

    def _check_generation(self, generation: int) -> None:
        if generation < 0:
            raise InvalidArgument(f"generation {generation} must be >= 0")
        if generation < self._state.generation:
            raise Conflict(
                f"generation {generation} is older than the recorded generation "
                f"{self._state.generation}"
            )

    def _artifact(self, sha256: str) -> Path | None:
        if not (self._models / f"{sha256}{_MANIFEST_SUFFIX}").is_file():
            return None
        for ext in EXTENSIONS.values():
            path = self._models / f"{sha256}.{ext}"
            if path.is_file():
                return path
        return None

    def _installed(self, sha256: str | None, role: str) -> InstalledModel | None:
        if sha256 is None:
            return None
        path = self._artifact(sha256)
        if path is None:
            logger.warning("%s %s is recorded but its files are missing", role, sha256[:16])
            return None
        manifest_bytes = (self._models / f"{sha256}{_MANIFEST_SUFFIX}").read_bytes()
        return InstalledModel(sha256, path, manifest_bytes)

    def _load(self) -> _State:
        errors: list[str] = []
        found = False
        for path in (self._state_path, self._backup_path):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            found = True
            try:
                state = _State.from_json(data)
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError too
                logger.warning("slot state %s is unreadable: %s", path, e)
                errors.append(f"{path.name}: {e}")
                continue
            if path == self._backup_path:
                logger.warning("restoring %s from its backup %s", self._state_path, path)
                _write_atomic(self._state_path, state.to_json())
                fsync_dir(self._root)
            return state
        if found:
            raise DataLoss(
                f"slot state under {self._root} is unreadable and so is its backup "
                f"({'; '.join(errors)}); the active model is unknown: move slots.json and "
                "slots.json.bak aside to start with no model"
            )
        return _State(None, None, 0)

    def _save(self, state: _State) -> None:
        data = state.to_json()
        _write_atomic(self._backup_path, data)
        _write_atomic(self._state_path, data)
        fsync_dir(self._root)
        self._state = state


def _check_sha256(sha256: str) -> None:
    if not _SHA256_HEX.fullmatch(sha256):
        raise InvalidArgument(f"model sha256 {sha256!r} is not 64 lowercase hex characters")


def _check_extension(extension: str) -> None:
    if extension not in EXTENSIONS.values():
        raise InvalidArgument(
            f"artifact extension {extension!r} is not supported; "
            f"supported: {', '.join(EXTENSIONS.values())}"
        )


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to path.tmp, flush, rename over `path` (the caller flushes the directory)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = ["EXTENSIONS", "InstalledModel", "ModelSlots"]
