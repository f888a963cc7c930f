"""Everything a device (or anyone on the broker) sends the coordinator, decoded once.

Each MQTT payload that reaches the coordinator passes through one function here
and comes out as a frozen, typed value whose every field is inside the range the
rest of the coordinator (and the database) can hold: the device id matches the
topic's, integers fit a signed 64-bit column (``seq < 2**63``), counts and sizes
are non-negative and bounded, timestamps lie within a year of the time of
arrival, strings and repeated fields have a maximum length, enums are ones this
version knows. Anything else raises `Refused` with a short machine-readable
`reason` (the label of the ``edgefleet_inbound_refused_total`` counter) and a
one-line detail naming the bad value and what is accepted.

`Refusals` counts refusals per (kind, reason) and logs at most one warning per
(device, reason) per `warn_every` seconds, so a device (or a forger) sending
garbage in a loop costs a counter increment, not a log line per message.

Protobuf types stop here: callers see only the dataclasses below.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from edgefleet.cloud.api.convert import (
    capabilities_from_pb,
    reason_from_pb,
    update_state_from_pb,
)
from edgefleet.cloud.devices.store import Birth
from edgefleet.cloud.devices.values import (
    Capabilities,
    Reported,
    ServedModel,
)
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.topics import check_device_id

logger = logging.getLogger(__name__)

INT63 = 2**63 - 1  # the largest value a signed 64-bit database column holds
YEAR_MS = 366 * 24 * 3600 * 1000

#: payload size limits per kind (bytes); MQTT allows 256 MB
MAX_PAYLOAD = {
    "status": 16 * 1024,
    "reported": 16 * 1024,
    "telemetry": 256 * 1024,
    "shadow": 16 * 1024,
    "want": 64 * 1024,
}
MAX_NAME = 128  # model names, variants, providers, runtimes, versions of the agent
MAX_DETAIL = 4096  # free-text detail of a reported state
MAX_LIST = 64  # runtimes, providers, features, tags, histogram bounds, drift features
MAX_BINS = 1024  # bins per drift feature, classes per prediction histogram
MAX_SKETCHES = 8  # drift sketches per telemetry window
MAX_RANGES = 1024  # missing-chunk ranges per want
MAX_CHUNKS = 1 << 24  # chunks per artifact
_SHA256_HEX = frozenset("0123456789abcdef")


class Refused(InvalidArgument):
    """A message the coordinator will not act on; `reason` is a stable short label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# -- values ---------------------------------------------------------------------------


#: the model a device names (`fleet.v1.ModelRef`)
ModelRef = ServedModel


@dataclass(frozen=True, slots=True)
class Status:
    """Birth (online, with capabilities) or last will (offline)."""

    device_id: str
    online: bool
    agent_version: str = ""
    capabilities: Capabilities | None = None
    active: ServedModel | None = None
    boot_id: str = ""
    timestamp_ms: int = 0

    @property
    def birth(self) -> Birth:
        """What `DeviceStore.record` keeps of it."""
        return Birth(
            online=self.online,
            agent_version=self.agent_version,
            capabilities=self.capabilities,
            active=self.active,
            boot_id=self.boot_id,
        )


@dataclass(frozen=True, slots=True)
class DriftSketch:
    model: ModelRef
    rows: int
    inputs: tuple[tuple[int, ...], ...]
    predictions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Telemetry:
    device_id: str
    seq: int
    window_start_ms: int
    window_end_ms: int
    active: ModelRef | None
    predictions: int
    errors: int
    bounds_us: tuple[float, ...]
    counts: tuple[int, ...]
    sum_us: float
    count: int
    rss_bytes: int
    cpu_percent: float
    spooled: bool
    drift: tuple[DriftSketch, ...]


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """A decoded `ShadowReport`: which device, generation and rollout, and its summary
    (numbers flattened for gates and storage: latency in µs, memory in MB)."""

    device_id: str
    generation: int
    rollout_id: str
    summary: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Want:
    device_id: str
    sha256: str
    chunks_total: int
    missing: tuple[tuple[int, int], ...]
    resume: bool


# -- checks ---------------------------------------------------------------------------

M = TypeVar("M", bound=Message)
E = TypeVar("E")


def _parse(cls: type[M], data: bytes, kind: str, device: str) -> M:
    limit = MAX_PAYLOAD[kind]
    if len(data) > limit:
        raise Refused(
            "too_large", f"{kind} from {device!r} is {len(data)} bytes; at most {limit} accepted"
        )
    msg = cls()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:  # RuntimeError: recursion too deep
        raise Refused(
            "malformed",
            f"{kind} from {device!r} ({len(data)} bytes) is not a valid {cls.__name__}: {e}",
        ) from None
    return msg


def _id(topic_device: str, kind: str) -> str:
    try:
        return check_device_id(topic_device)
    except InvalidArgument as e:
        raise Refused("bad_device_id", f"{kind}: {e}") from None


def _same_device(topic_device: str, named: str, kind: str) -> None:
    if named and named != topic_device:
        raise Refused(
            "wrong_device",
            f"{kind} on {topic_device!r}'s topic names device {named[:80]!r}; "
            "a device may only report for itself",
        )


def _int(value: int, what: str, *, high: int = INT63, low: int = 0) -> int:
    if not low <= value <= high:
        raise Refused("out_of_range", f"{what} {value} is outside [{low}, {high}]")
    return int(value)


def _float(value: float, what: str, *, high: float = 1e15, low: float = 0.0) -> float:
    if not (math.isfinite(value) and low <= value <= high):
        raise Refused("out_of_range", f"{what} {value!r} is outside [{low:g}, {high:g}]")
    return float(value)


def _str(value: str, what: str, *, limit: int = MAX_NAME) -> str:
    if len(value) > limit:
        raise Refused("too_long", f"{what} is {len(value)} characters; at most {limit} accepted")
    return value


def _list(values: Sequence[Any], what: str, *, limit: int = MAX_LIST) -> Sequence[Any]:
    if len(values) > limit:
        raise Refused("too_many", f"{what} has {len(values)} entries; at most {limit} accepted")
    return values


def _ts(value: int, what: str, now_ms: int) -> int:
    """0 (unset) or within a year of `now_ms`."""
    if value and not now_ms - YEAR_MS <= value <= now_ms + YEAR_MS:
        raise Refused(
            "bad_timestamp",
            f"{what} {value} is not within a year of the time of arrival ({now_ms}); "
            "send unix epoch milliseconds, or 0",
        )
    return int(value)


def _sha(value: str, what: str, *, allow_empty: bool = True) -> str:
    if (value or not allow_empty) and (len(value) != 64 or not _SHA256_HEX.issuperset(value)):
        raise Refused("bad_digest", f"{what} {value[:80]!r} is not 64 lowercase hex characters")
    return value


def _enum(convert: Callable[[int], E], value: int, what: str) -> E:
    try:
        return convert(value)
    except InvalidArgument as e:
        raise Refused("unknown_enum", f"{what}: {e}") from None


def _ref(m: device_pb2.ModelRef, what: str) -> ModelRef | None:
    if not m.model:
        return None
    return ModelRef(
        model=_str(m.model, f"{what} model"),
        version=int(m.version),  # uint32
        variant=_str(m.variant, f"{what} variant"),
        sha256=_sha(m.sha256, f"{what} sha256"),
    )


def _names(values: Sequence[str], what: str) -> tuple[str, ...]:
    return tuple(_str(v, f"{what} entry") for v in _list(values, what))


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- decoders -------------------------------------------------------------------------


def decode_status(topic_device: str, data: bytes, *, now_ms: int | None = None) -> Status:
    """A retained birth message; an empty payload (a cleared retained status) is offline."""
    dev = _id(topic_device, "status")
    if not data:
        return Status(dev, online=False)
    m = _parse(device_pb2.DeviceStatus, data, "status", dev)
    _same_device(dev, m.device_id, "status")
    now = _now_ms() if now_ms is None else now_ms
    caps = None
    if m.HasField("capabilities"):
        c = m.capabilities
        _str(c.machine, "capabilities.machine")
        _names(c.runtimes, "capabilities.runtimes")
        _names(c.providers, "capabilities.providers")
        _names(c.features, "capabilities.features")
        _int(c.memory_mb, "capabilities.memory_mb", high=1 << 40)
        try:
            caps = capabilities_from_pb(c)
        except InvalidArgument as e:
            raise Refused("unknown_enum", f"status from {dev!r}: {e}") from None
    return Status(
        device_id=dev,
        online=bool(m.online),
        agent_version=_str(m.agent_version, "agent_version"),
        capabilities=caps,
        active=_ref(m.active, "active"),
        boot_id=_str(m.boot_id, "boot_id"),
        timestamp_ms=_ts(m.timestamp_ms, "timestamp_ms", now),
    )


def decode_reported(topic_device: str, data: bytes, *, now_ms: int | None = None) -> Reported:
    """A retained reported state."""
    dev = _id(topic_device, "reported state")
    m = _parse(device_pb2.ReportedState, data, "reported", dev)
    _same_device(dev, m.device_id, "reported state")
    now = _now_ms() if now_ms is None else now_ms
    return Reported(
        device_id=m.device_id,
        generation=_int(m.generation, "generation"),
        state=_enum(update_state_from_pb, m.state, "state"),
        reason=_enum(reason_from_pb, m.reason, "reason"),
        detail=_str(m.detail, "detail", limit=MAX_DETAIL),
        active=_ref(m.active, "active"),
        last_known_good=_ref(m.last_known_good, "last_known_good"),
        chunks_have=_int(m.chunks_have, "chunks_have", high=m.chunks_total or MAX_CHUNKS),
        chunks_total=_int(m.chunks_total, "chunks_total", high=MAX_CHUNKS),
        provider=_str(m.provider, "provider"),
        timestamp_ms=_ts(m.timestamp_ms, "timestamp_ms", now),
    )


#: latency bounds already checked: a fleet sends a handful of distinct ones, once per
#: window each, so the per-value checks run once per distinct tuple (a tuple with NaN
#: never passes, so is never remembered)
_checked_bounds: dict[tuple[float, ...], None] = {}
_CHECKED_BOUNDS_MAX = 1024


def _latency_bounds(bounds: tuple[float, ...], dev: str) -> tuple[float, ...]:
    if bounds in _checked_bounds:
        return bounds
    bounds = tuple(_float(b, "latency bound") for b in bounds)
    if any(b >= c for b, c in pairwise(bounds)):
        raise Refused("out_of_range", f"telemetry from {dev!r}: latency bounds not increasing")
    if len(_checked_bounds) >= _CHECKED_BOUNDS_MAX:
        _checked_bounds.clear()
    _checked_bounds[bounds] = None
    return bounds


def decode_telemetry(topic_device: str, data: bytes, *, received_ms: int) -> Telemetry:
    dev = _id(topic_device, "telemetry")
    m = _parse(device_pb2.Telemetry, data, "telemetry", dev)
    _same_device(dev, m.device_id, "telemetry")
    lat = m.latency
    bounds = _latency_bounds(tuple(_list(lat.bounds_us, "latency bounds_us")), dev)
    counts = tuple(_list(lat.counts, "latency counts", limit=MAX_LIST + 1))
    if counts and max(counts) > INT63:  # uint64: never below 0; the culprit named
        counts = tuple(_int(c, "latency count") for c in counts)
    if counts and len(counts) != len(bounds) + 1:
        raise Refused(
            "histogram_shape",
            f"telemetry from {dev!r}: latency histogram has {len(counts)} counts "
            f"for {len(bounds)} bounds; expected bounds + 1",
        )
    start = _ts(m.window_start_ms, "window_start_ms", received_ms)
    end = _ts(m.window_end_ms, "window_end_ms", received_ms)
    if start and end and start > end:
        raise Refused(
            "bad_timestamp",
            f"telemetry from {dev!r}: window starts ({start}) after it ends ({end})",
        )
    drift = []
    for sk in _list(m.drift, "drift sketches", limit=MAX_SKETCHES):
        ref = _ref(sk.model, "drift model")
        if ref is None:
            continue
        drift.append(
            DriftSketch(
                model=ref,
                rows=_int(sk.rows, "drift rows"),
                inputs=tuple(
                    tuple(
                        _int(c, "drift count")
                        for c in _list(f.counts, "drift bins", limit=MAX_BINS)
                    )
                    for f in _list(sk.inputs, "drift inputs")
                ),
                predictions=tuple(
                    _int(c, "drift prediction count")
                    for c in _list(sk.predictions, "drift predictions", limit=MAX_BINS)
                ),
            )
        )
    return Telemetry(
        device_id=dev,
        seq=_int(m.seq, "seq"),
        window_start_ms=start,
        window_end_ms=end,
        active=_ref(m.active, "active"),
        predictions=_int(m.predictions, "predictions"),
        errors=_int(m.errors, "errors"),
        bounds_us=bounds,
        counts=counts,
        sum_us=_float(lat.sum_us, "latency sum_us", high=1e18),
        count=_int(lat.count, "latency count"),
        rss_bytes=_int(m.rss_bytes, "rss_bytes"),
        cpu_percent=_float(m.cpu_percent, "cpu_percent", high=100_000.0),
        spooled=bool(m.spooled),
        drift=tuple(drift),
    )


def decode_shadow_report(topic_device: str | None, data: bytes) -> ShadowReport:
    dev = _id(topic_device, "shadow report") if topic_device is not None else "?"
    m = _parse(device_pb2.ShadowReport, data, "shadow", dev)
    if topic_device is not None:
        _same_device(dev, m.device_id, "shadow report")
    samples = _int(m.samples, "samples")
    for name in ("agreed", "labelled", "errors", "dropped"):
        _int(getattr(m, name), name)
    if m.agreed > samples or m.labelled > samples:
        raise Refused(
            "out_of_range",
            f"shadow report from {dev!r}: agreed {m.agreed} / labelled {m.labelled} "
            f"exceed samples {samples}",
        )
    mb = 1024 * 1024
    summary: dict[str, float] = {
        "samples": float(samples),
        "agreed": float(m.agreed),
        "labelled": float(m.labelled),
        "errors": float(m.errors),
        "dropped": float(m.dropped),
        "rss_mb": _int(m.rss_bytes, "rss_bytes") / mb,
    }
    for side in ("active", "candidate"):
        st = getattr(m, side)
        _ref(st.model, f"{side} model")
        for q in ("p50", "p95"):
            summary[f"{side}_{q}_us"] = _float(getattr(st, f"latency_{q}_us"), f"{side} {q}")
        summary[f"{side}_memory_mb"] = _int(st.memory_bytes, f"{side} memory_bytes") / mb
        summary[f"{side}_correct"] = float(_int(st.correct, f"{side} correct", high=samples))
    return ShadowReport(
        device_id=m.device_id,
        generation=_int(m.generation, "generation"),
        rollout_id=_str(m.rollout_id, "rollout_id", limit=64),
        summary=summary,
    )


def decode_want(topic_sha256: str, data: bytes) -> Want:
    """Which chunks of the topic's artifact a device lacks."""
    _sha(topic_sha256, "want topic artifact", allow_empty=False)
    w = _parse(device_pb2.ArtifactWant, data, "want", "?")
    if w.device_id:
        _id(w.device_id, "want")
    if w.sha256 != topic_sha256:
        raise Refused(
            "wrong_artifact",
            f"want on {topic_sha256[:12]}…'s topic names artifact {w.sha256[:80]!r}",
        )
    total = _int(w.chunks_total, "chunks_total", high=MAX_CHUNKS)
    missing = []
    for r in _list(w.missing, "missing ranges", limit=MAX_RANGES):
        if not r.start < r.end <= (total or MAX_CHUNKS):
            raise Refused(
                "out_of_range",
                f"want from {w.device_id!r}: range [{r.start}, {r.end}) is empty or past "
                f"chunks_total {total}",
            )
        missing.append((int(r.start), int(r.end)))
    return Want(w.device_id, w.sha256, total, tuple(missing), bool(w.resume))


# -- counting refusals ------------------------------------------------------------------


class Refusals:
    """Counts of refused messages by (kind, reason), and rate-limited warnings.

    Thread-safe: the coordinator's event loop and the telemetry subscriber's paho
    thread share one.
    """

    def __init__(self, *, warn_every: float = 60.0, max_keys: int = 10_000) -> None:
        self.warn_every = warn_every
        self.counts: Counter[tuple[str, str]] = Counter()
        self._last_warned: dict[tuple[str, str], tuple[float, int]] = {}
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def refuse(self, kind: str, device: str, reason: str, detail: str) -> None:
        now = time.monotonic()
        key = (device[:64], reason)
        with self._lock:
            self.counts[(kind, reason)] += 1
            last, suppressed = self._last_warned.get(key, (-math.inf, 0))
            if now - last < self.warn_every:
                self._last_warned[key] = (last, suppressed + 1)
                return
            if len(self._last_warned) >= self._max_keys:  # many forged ids: forget old ones
                self._last_warned.clear()
            self._last_warned[key] = (now, 0)
        more = f" ({suppressed} more like it since the last warning)" if suppressed else ""
        logger.warning("refused %s from %r (%s): %s%s", kind, device[:64], reason, detail, more)

    def total(self, kind: str | None = None, reason: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (k, r), n in self.counts.items()
                if (kind is None or k == kind) and (reason is None or r == reason)
            )

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.counts)


__all__ = [
    "Capabilities",
    "DriftSketch",
    "ModelRef",
    "Refusals",
    "Refused",
    "Reported",
    "ShadowReport",
    "Status",
    "Telemetry",
    "Want",
    "decode_reported",
    "decode_shadow_report",
    "decode_status",
    "decode_telemetry",
    "decode_want",
]
