"""`fleet devices ls` filters: state, group, version, online/offline, staleness."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from edgefleet.cloud.devices.values import UpdateState
from edgefleet.protos.errors import InvalidArgument

if TYPE_CHECKING:
    from edgefleet.cloud.devices.store import Device

_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
CONNECTIVITY = ("online", "offline")


def parse_duration(text: str, *, option: str = "--stale") -> float:
    """``500ms``, ``30s``, ``5m``, ``2h``, ``1d`` or plain seconds, as seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise InvalidArgument(
            f"{option} {text!r} is not a duration; accepted e.g. 30s, 5m, 2h, 1d, 500ms"
        )
    return float(m.group("n")) * _UNITS[m.group("unit")]


def device_states() -> tuple[str, ...]:
    """Every state a device can be listed in: 'enrolled' (never reported) and the
    agent's update states (`UpdateState`)."""
    return ("enrolled", *(s.value for s in UpdateState if s is not UpdateState.UNSPECIFIED))


@dataclass(frozen=True)
class DeviceFilter:
    """What a listed device must match; None/empty fields do not filter."""

    state: str = ""  # update state, e.g. active
    group: str = ""
    model: str = ""  # serving this model…
    version: int | None = None  # …at this version
    connectivity: str = ""  # online | offline
    stale_s: float = 0.0  # last seen more than this long ago (never seen counts)

    def __post_init__(self) -> None:
        if self.connectivity and self.connectivity not in CONNECTIVITY:
            raise InvalidArgument(
                f"connectivity {self.connectivity!r} unknown; accepted: online, offline"
            )
        if self.stale_s < 0:
            raise InvalidArgument(f"staleness {self.stale_s}s must be >= 0")
        if self.state and self.state not in (accepted := device_states()):
            raise InvalidArgument(
                f"device state {self.state!r} unknown; accepted: {', '.join(accepted)}"
            )

    @classmethod
    def parse(
        cls,
        *,
        state: str | None = None,
        group: str | None = None,
        version: str | None = None,
        online: bool = False,
        offline: bool = False,
        stale: str | None = None,
    ) -> DeviceFilter:
        """From CLI options; `version` is NAME or NAME:VERSION."""
        from edgefleet.cloud.registry import ModelRef

        if online and offline:
            raise InvalidArgument("--online and --offline exclude each other; give one")
        model, ver = "", None
        if version:
            ref = ModelRef.parse(version)
            if ref.stage is not None:
                raise InvalidArgument(
                    f"--version {version!r}: give NAME or NAME:VERSION, not a stage"
                )
            model, ver = ref.name, ref.version
        return cls(
            state=(state or "").strip().lower(),
            group=group or "",
            model=model,
            version=ver,
            connectivity="online" if online else "offline" if offline else "",
            stale_s=parse_duration(stale) if stale else 0.0,
        )

    @property
    def version_text(self) -> str:
        if not self.model:
            return ""
        return f"{self.model}:{self.version}" if self.version is not None else self.model

    def matches(self, d: Device, *, now: datetime | None = None) -> bool:
        if self.state and d.state != self.state:
            return False
        if self.group and d.group != self.group:
            return False
        if self.model:
            active = d.active
            if active is None or active.model != self.model:
                return False
            if self.version is not None and active.version != self.version:
                return False
        if self.connectivity and d.online != (self.connectivity == "online"):
            return False
        if self.stale_s and d.last_seen is not None:
            now = now or datetime.now(UTC)
            if (now - d.last_seen).total_seconds() <= self.stale_s:
                return False
        return True


__all__ = ["CONNECTIVITY", "DeviceFilter", "parse_duration"]
