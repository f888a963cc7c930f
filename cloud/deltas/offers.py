"""Which delta each device gets: per device the first of its active and last-known-good
artifacts (as it last reported them) that has a delta to its target worth sending."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgefleet.cloud.deltas.cache import DeltaCache
from edgefleet.cloud.deltas.store import DeltaRecord, DeltaStore
from edgefleet.cloud.devices import Device

#: the `Capabilities.features` entry of agents that apply deltas (agent/delta.py)
FEATURE = "delta"


def device_bases(d: Device) -> list[str]:
    """The artifacts a device holds, best first: active, then last-known-good."""
    out: list[str] = []
    rep = d.reported
    for ref in (d.active, rep and rep.active, rep and rep.last_known_good):
        sha = ref.sha256 if ref else ""
        if sha and sha not in out:
            out.append(sha)
    return out


def plan_offers(
    cache: DeltaCache, devices: Sequence[Device], targets: Mapping[str, str]
) -> dict[str, DeltaRecord]:
    """{device: delta} for the devices in `targets` ({device: target sha256}) that hold a
    base with a delta worth sending; each (base, target) pair is built at most once
    (blocking)."""
    built: dict[tuple[str, str], DeltaRecord | None] = {}
    out: dict[str, DeltaRecord] = {}
    for d in devices:
        target = targets.get(d.device_id)
        if not target or d.capabilities is None or FEATURE not in d.capabilities.features:
            continue  # an agent without the [delta] extra (or too old) gets the full artifact
        for base in device_bases(d):
            if base == target:
                break  # nothing to send at all
            if (base, target) not in built:
                built[(base, target)] = cache.get_or_build(base, target)
            rec = built[(base, target)]
            if rec is not None:
                out[d.device_id] = rec
                break
    return out


@dataclass(frozen=True)
class WireSummary:
    """What one broadcast of a deploy sends: one stream per delta (base -> target) group
    and one per artifact fetched in full, against the full artifacts alone."""

    wire_bytes: int
    full_bytes: int
    via_delta: int
    devices: int

    def describe(self) -> str:
        share = 100 * self.wire_bytes / max(1, self.full_bytes)
        return (
            f"bytes to send: {self.wire_bytes:,} vs {self.full_bytes:,} full ({share:.1f}%); "
            f"{self.via_delta} of {self.devices} devices via deltas"
        )


def wire_summary(records: DeltaStore, targets: Sequence[tuple[str, str, int]]) -> WireSummary:
    """For (base sha256 or "", target sha256, target size) per device: the deltas
    recorded for those pairs decide what goes on the wire (blocking)."""
    streams: dict[str, int] = {}
    full: dict[str, int] = {}
    via = 0
    for base, target, size in targets:
        full[target] = size
        rec = records.get(base, target) if base and base != target else None
        if rec is not None and rec.usable:
            streams[rec.sha256] = rec.size
            via += 1
        elif base != target:
            streams[target] = size
    return WireSummary(sum(streams.values()), sum(full.values()), via, len(targets))
