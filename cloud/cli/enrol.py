"""Many devices at once for `fleet devices enroll`: which ids (arguments, a file, a count
with a prefix), and their bundles written to a folder, one file per device.

Every id is checked before anything is enrolled; the coordinator enrols each batch all
or nothing (one credential write, one broker reload per batch).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.protos.errors import FleetError, InvalidArgument, Unavailable
from edgefleet.protos.topics import check_device_id

if TYPE_CHECKING:
    from edgefleet.cloud.devices import DeviceSpec
    from edgefleet.cloud.services.values import EnrolledBatch, EnrollmentBundle

logger = logging.getLogger(__name__)

#: devices per enrolment call (each one credential write and one broker reload)
DEFAULT_BATCH = 10_000


def ids_from_file(path: Path) -> list[str]:
    """One device id per line; blank lines and '#' comments skipped; '-': stdin.
    InvalidArgument names the file, the line and what is accepted."""
    name = "stdin" if str(path) == "-" else str(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as e:
        raise InvalidArgument(f"cannot read device ids from {name}: {e.strerror}") from None
    ids: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            ids.append(check_device_id(item))
        except InvalidArgument as e:
            raise InvalidArgument(
                f"{name} line {n}: {e} (one id per line); nothing was enrolled"
            ) from None
    return ids


def counted_ids(prefix: str, count: int, start: int) -> list[str]:
    """PREFIX-0000 … (zero-padded to at least 4 digits), as `fleet sim` names devices."""
    if count < 1 or start < 0:
        raise InvalidArgument(f"--count {count} --start {start}: count ≥ 1 and start ≥ 0")
    width = max(4, len(str(start + count - 1)))
    ids = [f"{prefix}-{i:0{width}d}" for i in range(start, start + count)]
    try:
        check_device_id(ids[-1])
    except InvalidArgument as e:
        raise InvalidArgument(f"--prefix {prefix!r}: {e}; nothing was enrolled") from None
    return ids


def check_all(ids: Sequence[str], *, done: str = "enrolled") -> None:
    """Every id valid and listed once (InvalidArgument names the first that is not and
    says nothing was `done`)."""
    seen: set[str] = set()
    for d in ids:
        try:
            check_device_id(d)
        except InvalidArgument as e:
            raise InvalidArgument(f"{e}; nothing was {done}") from None
        if d in seen:
            raise InvalidArgument(
                f"device {d!r} is listed twice (each id once); nothing was {done}"
            )
        seen.add(d)
    if not ids:
        raise InvalidArgument("no devices given: give at least one device id")


@dataclass
class BundleFolder:
    """Where the bundles go: DIR/<id>.json, mode 0600, in a 0700 folder."""

    directory: Path

    def path(self, device_id: str) -> Path:
        return self.directory / f"{device_id}.json"

    def prepare(self, ids: Sequence[str], *, keep_existing: bool) -> None:
        """Before anything is enrolled: the folder exists and takes files, and no bundle
        there would be overwritten (unless `keep_existing`: a rerun that skips the devices
        enrolled before, whose files stay as they are)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
            probe = self.directory / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise Unavailable(
                f"cannot write bundles to {self.directory}: {e.strerror}; nothing was enrolled"
            ) from None
        if keep_existing:
            return
        there = [d for d in ids if self.path(d).exists()]
        if there:
            raise InvalidArgument(
                f"{self.path(there[0])} exists ({len(there)} of these devices have a bundle "
                "there): enrolling would replace it; pass another --out folder, or "
                "--skip-existing to leave devices enrolled before as they are; "
                "nothing was enrolled"
            )

    def write(self, bundle: EnrollmentBundle) -> Path:
        path = self.path(bundle.device_id)
        tmp = path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(bundle.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


@dataclass
class Outcome:
    enrolled: list[str]
    existing: list[str]
    batches: int
    broker_url: str = ""


def enrol_in_batches(
    enroll: Callable[[Sequence[DeviceSpec]], EnrolledBatch],
    ids: Sequence[str],
    *,
    group: str,
    tags: Mapping[str, str],
    folder: BundleFolder,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    verb: str = "enrolled",
) -> Outcome:
    """Enrol `ids` `batch_size` at a time, each batch's bundles written before the next
    is asked for. A batch that fails enrols none of its devices; the batches before it
    stay enrolled, with their bundles written (the error says so). A batch whose answer
    broke off (`BatchCutOff`) was done: the bundles that arrived are written, and the ids
    whose bundles did not go to `folder/reissue.txt` for `fleet devices reissue`.
    `verb`: what a batch does to its devices, for the messages ("reissued")."""
    from edgefleet.cloud.devices import DeviceSpec  # sqlmodel: not at CLI start
    from edgefleet.cloud.services.values import BatchCutOff

    out = Outcome(enrolled=[], existing=[], batches=0)
    for start in range(0, len(ids), batch_size):
        part = ids[start : start + batch_size]
        specs = [DeviceSpec(d, group, dict(tags)) for d in part]
        try:
            batch = enroll(specs)
        except BatchCutOff as e:
            _write_all(folder, e.received, out)
            listed = folder.directory / "reissue.txt"
            _write_ids(listed, e.missing)
            raise Unavailable(
                f"{e} (batch {out.batches + 1}): the coordinator {verb} all {len(part)} "
                f"devices of that batch, but its answer broke off: {len(e.received.bundles)} "
                f"bundles were written to {folder.directory}, {len(e.missing)} did not arrive "
                f"(their ids are in {listed}; get new bundles for them with 'fleet devices "
                f"reissue --from-file {listed} --out {folder.directory}')"
                + (
                    f"; the devices of the batches after it were not {verb}"
                    if start + len(part) < len(ids)
                    else ""
                )
            ) from None
        except FleetError as e:
            if out.enrolled:
                raise type(e)(
                    f"{e} (batch {out.batches + 1}; the {len(out.enrolled)} devices of the "
                    f"batches before it are {verb}, their bundles in {folder.directory}: "
                    + (
                        "rerun with --skip-existing to enrol the rest)"
                        if verb == "enrolled"
                        else "rerun with the ids after them)"
                    )
                ) from None
            raise
        _write_all(folder, batch, out)
        if progress is not None:
            progress(len(out.enrolled) + len(out.existing), len(ids))
    return out


def _write_all(folder: BundleFolder, batch: EnrolledBatch, out: Outcome) -> None:
    """Write a batch's bundles (as many as can be) and count them into `out`."""
    out.batches += 1
    out.existing += batch.existing
    unwritten: list[str] = []
    for b in batch.bundles:
        try:
            folder.write(b)
        except OSError as e:
            logger.error("bundle of %s not written: %s", b.device_id, e.strerror)
            unwritten.append(b.device_id)
        out.enrolled.append(b.device_id)
        out.broker_url = out.broker_url or b.broker_url
    if unwritten:
        raise Unavailable(
            f"{len(unwritten)} devices got new credentials but their bundles could not be "
            f"written to {folder.directory} ({', '.join(unwritten[:3])}"
            f"{' …' if len(unwritten) > 3 else ''}): get new ones once the folder takes "
            "files with 'fleet devices reissue ID… --out DIR'"
        )


def _write_ids(path: Path, ids: Sequence[str]) -> None:
    try:
        path.write_text("".join(f"{d}\n" for d in ids))
    except OSError as e:  # the ids are in the error message's count; say where they are not
        logger.error("could not list the ids without bundles in %s: %s", path, e.strerror)
