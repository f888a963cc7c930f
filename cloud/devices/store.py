"""DeviceStore: enrolled devices and their last known state, in the registry database."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from edgefleet.cloud.db import DatabaseUser
from edgefleet.cloud.devices.selector import Selector
from edgefleet.cloud.devices.values import (
    Accelerator,
    Capabilities,
    DeviceSpec,
    ReasonCode,
    Reported,
    ServedModel,
    UpdateState,
)
from edgefleet.cloud.registry.tables import UtcDateTime
from edgefleet.protos.errors import AlreadyExists, InvalidArgument, NotFound
from edgefleet.protos.topics import check_device_id

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class DeviceRow(SQLModel, table=True):
    __tablename__ = "devices"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, unique=True, max_length=64)
    group: str = Field(default="", max_length=64)
    tags: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    enrolled_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)
    online: bool = False
    last_seen: datetime | None = Field(default=None, sa_type=UtcDateTime)
    boot_id: str = ""
    agent_version: str = ""
    # capabilities (birth message); accelerator "" until the device has said
    machine: str = Field(default="", max_length=128)
    runtimes: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    providers: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    accelerator: str = Field(default="", max_length=8)
    memory_mb: int = Field(default=0, sa_type=sa.BigInteger)
    tflite_runtime_legacy: bool = False
    features: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    # the model it serves; model "" for none
    active_model: str = Field(default="", max_length=128)
    active_version: int = Field(default=0, sa_type=sa.BigInteger)
    active_variant: str = Field(default="", max_length=128)
    active_sha256: str = Field(default="", max_length=64)
    # last reported state; update_state "" until the device has reported
    update_state: str = Field(default="", max_length=16)
    update_reason: str = Field(default="", max_length=32)
    reported_generation: int = Field(default=0, sa_type=sa.BigInteger)
    detail: str = Field(default="", sa_type=sa.Text)
    lkg_model: str = Field(default="", max_length=128)
    lkg_version: int = Field(default=0, sa_type=sa.BigInteger)
    lkg_variant: str = Field(default="", max_length=128)
    lkg_sha256: str = Field(default="", max_length=64)
    chunks_have: int = Field(default=0, sa_type=sa.BigInteger)
    chunks_total: int = Field(default=0, sa_type=sa.BigInteger)
    provider: str = Field(default="", max_length=128)
    reported_ms: int = Field(default=0, sa_type=sa.BigInteger)
    desired_generation: int = 0
    desired: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    rollout_id: str = ""
    #: set by `fleet devices revoke|rm`: its credential is gone and what it sends is ignored
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


@dataclass(frozen=True)
class Device:
    device_id: str
    group: str
    tags: Mapping[str, str]
    enrolled_at: datetime
    online: bool
    last_seen: datetime | None
    agent_version: str
    capabilities: Capabilities | None
    active: ServedModel | None
    reported: Reported | None
    desired_generation: int
    rollout_id: str
    boot_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    revoked_at: datetime | None = None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "enrolled" if self.reported is None else str(self.reported.state)


#: (device id, generation) -> the signed desired state for it
Sign = Callable[[str, int], bytes]
_BATCH = 500


def issue_desired(
    s: Session, device_ids: Sequence[str], sign: Sign, *, rollout_id: str
) -> dict[str, tuple[int, bytes]]:
    """In the caller's transaction: give each device its next generation, sign its desired
    state and store it. Returns {device: (generation, signed)}; NotFound names a device
    that is not enrolled (and the caller's transaction should roll back)."""
    if not device_ids:
        return {}
    gens: dict[str, int] = {}
    for i in range(0, len(device_ids), _BATCH):
        part = list(device_ids[i : i + _BATCH])
        rows = s.execute(
            sa.update(DeviceRow)
            .where(col(DeviceRow.device_id).in_(part))
            .values(desired_generation=DeviceRow.desired_generation + 1)
            .returning(col(DeviceRow.device_id), col(DeviceRow.desired_generation))
        ).all()
        gens.update({str(r[0]): int(r[1]) for r in rows})
    missing = [d for d in device_ids if d not in gens]
    if missing:
        raise NotFound(f"device {missing[0]!r} is not enrolled ({len(missing)} missing)")
    out = {d: (gens[d], sign(d, gens[d])) for d in device_ids}
    table: sa.Table = DeviceRow.__table__  # type: ignore[attr-defined]
    s.execute(
        sa.update(table)
        .where(table.c.device_id == sa.bindparam("b_id"))
        .values(desired=sa.bindparam("b_desired"), rollout_id=rollout_id),
        [{"b_id": d, "b_desired": signed} for d, (_g, signed) in out.items()],
    )
    return out


def _served(model: str, version: int, variant: str, sha256: str) -> ServedModel | None:
    return ServedModel(model, version, variant, sha256) if model else None


def _capabilities(r: DeviceRow) -> Capabilities | None:
    if not r.accelerator:
        return None
    return Capabilities(
        machine=r.machine,
        runtimes=tuple(r.runtimes),
        providers=tuple(r.providers),
        accelerator=Accelerator(r.accelerator),
        memory_mb=r.memory_mb,
        tflite_runtime_legacy=r.tflite_runtime_legacy,
        features=tuple(r.features),
    )


def _reported(r: DeviceRow) -> Reported | None:
    if not r.update_state:
        return None
    return Reported(
        device_id=r.device_id,
        generation=r.reported_generation,
        state=UpdateState(r.update_state),
        reason=ReasonCode(r.update_reason or ReasonCode.UNSPECIFIED),
        detail=r.detail,
        active=_served(r.active_model, r.active_version, r.active_variant, r.active_sha256),
        last_known_good=_served(r.lkg_model, r.lkg_version, r.lkg_variant, r.lkg_sha256),
        chunks_have=r.chunks_have,
        chunks_total=r.chunks_total,
        provider=r.provider,
        timestamp_ms=r.reported_ms,
    )


def check_batch_ids(device_ids: Iterable[str], *, done: str = "enrolled") -> list[str]:
    """The ids of a batch, each checked (InvalidArgument names the first bad or repeated
    one, and says what is accepted). `done`: what the error says did not happen."""
    ids: list[str] = []
    seen: set[str] = set()
    for n, d in enumerate(device_ids, 1):
        try:
            check_device_id(d)
        except InvalidArgument as e:
            raise InvalidArgument(f"entry {n}: {e}; nothing was {done}") from None
        if d in seen:
            raise InvalidArgument(
                f"entry {n}: device {d!r} is listed twice (each id once); nothing was {done}"
            )
        seen.add(d)
        ids.append(d)
    if not ids:
        raise InvalidArgument("no devices given: give at least one device id")
    return ids


def some_devices(ids: Sequence[str], are: str) -> str:
    """'N of these devices are <are>: 'a', 'b', 'c' and K more' (the first three named)."""
    more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
    return f"{len(ids)} of these devices are {are}: {', '.join(repr(d) for d in ids[:3])}{more}"


def already_enrolled(known: Sequence[str]) -> str:
    if len(known) == 1:
        return f"device {known[0]!r} is already enrolled"
    return some_devices(known, "already enrolled")


def _set_active(row: DeviceRow, m: ServedModel) -> None:
    row.active_model, row.active_version = m.model, m.version
    row.active_variant, row.active_sha256 = m.variant, m.sha256


def _device(r: DeviceRow) -> Device:
    return Device(
        device_id=r.device_id,
        group=r.group,
        tags=dict(r.tags),
        enrolled_at=r.enrolled_at,
        online=r.online,
        last_seen=r.last_seen,
        agent_version=r.agent_version,
        capabilities=_capabilities(r),
        active=_served(r.active_model, r.active_version, r.active_variant, r.active_sha256),
        reported=_reported(r),
        desired_generation=r.desired_generation,
        rollout_id=r.rollout_id,
        boot_id=r.boot_id,
        revoked_at=r.revoked_at,
    )


@dataclass(frozen=True, slots=True)
class Birth:
    """A status message: birth (online, with what it can run and serves) or last will."""

    online: bool
    agent_version: str = ""
    capabilities: Capabilities | None = None
    active: ServedModel | None = None
    boot_id: str = ""


@dataclass(frozen=True)
class DeviceEvent:
    """One thing a device said: its status (birth / will), a reported state, or just
    that it was seen (telemetry; `payload` None)."""

    device_id: str
    payload: Birth | Reported | None
    at: datetime

    @property
    def kind(self) -> str:
        if isinstance(self.payload, Birth):
            return "status"
        return "reported" if isinstance(self.payload, Reported) else "seen"


def _apply(row: DeviceRow, e: DeviceEvent) -> None:
    row.last_seen = e.at
    p = e.payload
    if isinstance(p, Birth):
        row.online = p.online
        if p.online:
            row.boot_id = p.boot_id
            row.agent_version = p.agent_version
            c = p.capabilities
            row.machine = c.machine if c else ""
            row.runtimes = list(c.runtimes) if c else []
            row.providers = list(c.providers) if c else []
            row.accelerator = str(c.accelerator) if c else ""
            row.memory_mb = c.memory_mb if c else 0
            row.tflite_runtime_legacy = c.tflite_runtime_legacy if c else False
            row.features = list(c.features) if c else []
            if p.active is not None:
                _set_active(row, p.active)
    elif isinstance(p, Reported):
        row.update_state, row.update_reason = str(p.state), str(p.reason)
        row.reported_generation, row.detail = p.generation, p.detail
        lkg = p.last_known_good
        row.lkg_model, row.lkg_version = (lkg.model, lkg.version) if lkg else ("", 0)
        row.lkg_variant, row.lkg_sha256 = (lkg.variant, lkg.sha256) if lkg else ("", "")
        row.chunks_have, row.chunks_total = p.chunks_have, p.chunks_total
        row.provider, row.reported_ms = p.provider, p.timestamp_ms
        if p.active is not None:
            _set_active(row, p.active)


class DeviceStore(DatabaseUser):
    what = "device database"

    def _session(self) -> AbstractContextManager[Session]:
        return self._db.session()

    def _row(self, s: Session, device_id: str) -> DeviceRow:
        row = s.exec(select(DeviceRow).where(DeviceRow.device_id == device_id)).first()
        if row is None:
            raise NotFound(
                f"device {device_id!r} is not enrolled (fleet devices enroll {device_id})"
            )
        return row

    def enroll(
        self, device_id: str, *, group: str = "", tags: Mapping[str, str] | None = None
    ) -> Device:
        check_device_id(device_id)
        with self._session() as s:
            row = DeviceRow(device_id=device_id, group=group, tags=dict(tags or {}))
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise AlreadyExists(f"device {device_id!r} is already enrolled") from None
            return _device(row)

    def enroll_many(
        self, specs: Sequence[DeviceSpec], *, now: datetime | None = None
    ) -> list[Device]:
        """Enrol many devices in one transaction: all or none. AlreadyExists names the
        ids enrolled before (nothing is added then)."""
        ids = check_batch_ids(d.device_id for d in specs)
        at = now or _now()
        template = DeviceRow(device_id="-", enrolled_at=at).model_dump(exclude={"id"})
        rows = [
            {**template, "device_id": d.device_id, "group": d.group, "tags": dict(d.tags)}
            for d in specs
        ]
        table: sa.Table = DeviceRow.__table__  # type: ignore[attr-defined]
        with self._session() as s:
            known = self._existing(s, ids)
            if known:
                raise AlreadyExists(already_enrolled(known))
            try:
                for i in range(0, len(rows), _BATCH):
                    s.execute(sa.insert(table), rows[i : i + _BATCH])
                s.commit()
            except IntegrityError:  # enrolled meanwhile by someone else: theirs stand
                s.rollback()
                raise AlreadyExists(already_enrolled(self._existing(s, ids))) from None
        return [
            Device(
                device_id=r["device_id"],
                group=r["group"],
                tags=r["tags"],
                enrolled_at=at,
                online=False,
                last_seen=None,
                agent_version="",
                capabilities=None,
                active=None,
                reported=None,
                desired_generation=0,
                rollout_id="",
            )
            for r in rows
        ]

    def existing(self, device_ids: Sequence[str]) -> list[str]:
        """Which of `device_ids` are enrolled (revoked ones included), in their order."""
        with self._session() as s:
            return self._existing(s, device_ids)

    def _existing(self, s: Session, device_ids: Sequence[str]) -> list[str]:
        found: set[str] = set()
        for i in range(0, len(device_ids), _BATCH):
            part = list(device_ids[i : i + _BATCH])
            found.update(
                s.exec(select(DeviceRow.device_id).where(col(DeviceRow.device_id).in_(part)))
            )
        return [d for d in device_ids if d in found]

    def revoke(self, device_id: str, *, now: datetime | None = None) -> Device:
        """Mark the device revoked (offline, nothing it sends recorded any more)."""
        with self._session() as s:
            row = self._row(s, device_id)
            if row.revoked_at is None:
                row.revoked_at = now or _now()
            row.online = False
            s.add(row)
            s.commit()
            return _device(row)

    def get(self, device_id: str) -> Device:
        with self._session() as s:
            return _device(self._row(s, device_id))

    def get_many(self, device_ids: Sequence[str]) -> list[Device]:
        """The devices `device_ids` names, in that order (revoked ones included), read
        in a few queries. NotFound names the ids that are not enrolled."""
        rows: dict[str, Device] = {}
        with self._session() as s:
            for i in range(0, len(device_ids), _BATCH):
                part = list(device_ids[i : i + _BATCH])
                q = select(DeviceRow).where(col(DeviceRow.device_id).in_(part))
                rows.update((r.device_id, _device(r)) for r in s.exec(q))
        missing = [d for d in device_ids if d not in rows]
        if missing:
            raise NotFound(
                f"{some_devices(missing, 'not enrolled')} (fleet devices enroll ID enrols one)"
            )
        return [rows[d] for d in device_ids]

    def find(self, selector: Selector | None = None, *, online: bool | None = None) -> list[Device]:
        with self._session() as s:
            q = select(DeviceRow).order_by(col(DeviceRow.device_id))
            if online is not None:
                q = q.where(DeviceRow.online == online)
            rows = s.exec(q).all()
            out = [_device(r) for r in rows]
        if selector is not None:
            out = [d for d in out if selector.matches(d.device_id, d.group, d.tags)]
        return out

    def record_status(self, device_id: str, status: Birth, *, now: datetime | None = None) -> bool:
        """Birth or last will. Returns False (and changes nothing) for an unknown device."""
        return self.record([DeviceEvent(device_id, status, now or _now())]) == 1

    def record_reported(
        self, device_id: str, reported: Reported, *, now: datetime | None = None
    ) -> bool:
        return self.record([DeviceEvent(device_id, reported, now or _now())]) == 1

    def record(self, events: Sequence[DeviceEvent]) -> int:
        """Apply status / reported / seen events in order, in one transaction.

        The coordinator batches what arrives over MQTT into one call per flush
        (one commit for hundreds of messages instead of one each). Events from
        unenrolled devices are logged and skipped. Returns how many were applied.
        """
        if not events:
            return 0
        applied = 0
        with self._session() as s:
            ids = {e.device_id for e in events}
            rows = {
                r.device_id: r
                for r in s.exec(select(DeviceRow).where(col(DeviceRow.device_id).in_(ids))).all()
            }
            for e in events:
                row = rows.get(e.device_id)
                if row is None:
                    logger.warning("%s from unenrolled device %r ignored", e.kind, e.device_id)
                    continue
                if row.revoked_at is not None:
                    logger.warning("%s from revoked device %r ignored", e.kind, e.device_id)
                    continue
                _apply(row, e)
                applied += 1
            s.add_all(list(rows.values()))
            s.commit()
        return applied

    def touch(self, device_ids: list[str], *, now: datetime | None = None) -> None:
        if not device_ids:
            return
        with self._session() as s:
            # rows locked in id order first, the order `record` flushes in: two
            # coordinator replicas touching the same devices never deadlock
            ids = s.exec(
                select(DeviceRow.id)
                .where(col(DeviceRow.device_id).in_(device_ids))
                .order_by(col(DeviceRow.id))
                .with_for_update()
            ).all()
            s.execute(
                sa.update(DeviceRow)
                .where(col(DeviceRow.id).in_(list(ids)))
                .values(last_seen=now or _now())
            )
            s.commit()

    def next_generation(self, device_id: str) -> int:
        """Allocate the next desired generation for a device (strictly increasing)."""
        with self._session() as s:
            res = s.execute(
                sa.update(DeviceRow)
                .where(col(DeviceRow.device_id) == device_id)
                .values(desired_generation=DeviceRow.desired_generation + 1)
                .returning(col(DeviceRow.desired_generation))
            ).first()
            if res is None:
                raise NotFound(f"device {device_id!r} is not enrolled")
            s.commit()
            return int(res[0])

    def issue(
        self, device_ids: Sequence[str], sign: Sign, *, rollout_id: str
    ) -> dict[str, tuple[int, bytes]]:
        """`issue_desired` for these devices in one transaction."""
        with self._session() as s:
            out = issue_desired(s, device_ids, sign, rollout_id=rollout_id)
            s.commit()
            return out

    def set_desired(
        self, device_id: str, generation: int, signed: bytes, *, rollout_id: str
    ) -> None:
        with self._session() as s:
            row = self._row(s, device_id)
            row.desired = signed
            row.rollout_id = rollout_id
            row.desired_generation = max(row.desired_generation, generation)
            s.add(row)
            s.commit()

    def unreached(self, device_ids: Sequence[str] | None = None) -> dict[str, bytes]:
        """{device: signed desired state} for the devices (all, or these) whose reported
        generation is below their desired one: what the coordinator re-publishes so
        that a broker which lost its retained messages cannot make a device miss it."""
        q = sa.select(col(DeviceRow.device_id)).where(
            col(DeviceRow.desired_generation) > 0,
            col(DeviceRow.desired).is_not(None),
            col(DeviceRow.reported_generation) < col(DeviceRow.desired_generation),
        )
        if device_ids is not None:
            if not device_ids:
                return {}
            q = q.where(col(DeviceRow.device_id).in_(list(device_ids)))
        out: dict[str, bytes] = {}
        with self._session() as s:
            behind = [str(r[0]) for r in s.execute(q).all()]
            for i in range(0, len(behind), _BATCH):
                part = behind[i : i + _BATCH]
                rows = s.execute(
                    sa.select(col(DeviceRow.device_id), col(DeviceRow.desired)).where(
                        col(DeviceRow.device_id).in_(part)
                    )
                ).all()
                out.update({str(r[0]): bytes(r[1]) for r in rows if r[1]})
        return out

    def desired(self, device_id: str) -> bytes | None:
        with self._session() as s:
            return self._row(s, device_id).desired
