"""Which devices a simulated fleet has: ids, profiles, groups and tags, without agents.

`plan()` is deterministic in (n, profile, seed, id_prefix), so a fleet split over
several processes (`simulator.cluster`) gets the same ids and profiles as one
process would: each worker takes its slice ``[first, first + n)`` of the whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.topics import check_device_id
from edgefleet.simulator.profiles import Mix, Profile, parse_profile

if TYPE_CHECKING:
    from edgefleet.cloud.devices import DeviceSpec


@dataclass(frozen=True)
class Enrollment:
    """What to enroll a simulated device with: `store.enroll_many(device_specs(plan))`."""

    device_id: str
    group: str
    tags: dict[str, str]
    profile: Profile


def device_specs(enrollments: Iterable[Enrollment]) -> list[DeviceSpec]:
    """What `DeviceStore.enroll_many` / `enroll_devices` take (one batch for them all)."""
    from edgefleet.cloud.devices import DeviceSpec

    return [DeviceSpec(e.device_id, e.group, dict(e.tags)) for e in enrollments]


def plan(
    n: int,
    profile: str | Profile | Mix = "mixed",
    *,
    seed: int = 0,
    id_prefix: str = "sim",
    first: int = 0,
    total: int | None = None,
) -> list[Enrollment]:
    """Devices ``first .. first+n-1`` of a fleet of `total` (default ``first + n``)."""
    if n < 1:
        raise InvalidArgument(f"simulated fleet size {n} must be >= 1")
    if first < 0:
        raise InvalidArgument(f"first device index {first} must be >= 0")
    total = first + n if total is None else total
    if first + n > total:
        raise InvalidArgument(f"devices {first}..{first + n - 1} do not fit in a fleet of {total}")
    check_device_id(f"{id_prefix}-{total - 1:04d}")
    profiles = parse_profile(profile).assign(total, seed=seed)[first : first + n]
    return [
        Enrollment(f"{id_prefix}-{first + i:04d}", p.name, {"profile": p.name}, p)
        for i, p in enumerate(profiles)
    ]


__all__ = ["Enrollment", "plan"]
