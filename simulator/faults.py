"""Fault plans for a simulated fleet: ``--faults "drop_link:10%@5s,crash:3@20s,…"``.

Each item is ``KIND[:WHO][@WHEN][=ARG]``:

- KIND: ``drop_link`` (socket closed, the agent reconnects), ``crash`` (agent killed
  mid-whatever, will published; it boots again on the same state directory after
  ARG, default 2s, or never with ``=never``), ``restart`` (crash-free reboot on the same state
  directory), ``corrupt`` (the next ARG chunks, default 1, get a flipped byte),
  ``lose`` (the next ARG chunks, default 1, never reach the updater),
  ``slow_link`` (chunk downlink capped at ARG, e.g. ``64kB/s``, ``1MB/s``),
  ``drift`` (live inputs become ``x * SCALE + SHIFT``; ARG ``SHIFT``, ``xSCALE`` or
  ``SHIFTxSCALE``, e.g. ``=4``, ``=x1.5``, ``=2x0.5``; default ``=4``).
- WHO: a device count (``3``), a share of the fleet (``10%``), or every device of a
  group (``group=gpu``; simulated devices are grouped by profile); default 1 device.
- WHEN: seconds after the fleet is up (``5s``, ``500ms``, ``2m``); default 0.

Devices are picked deterministically from the seed, so a plan repeats.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgefleet.protos.errors import InvalidArgument

KINDS = ("drop_link", "crash", "restart", "corrupt", "lose", "slow_link", "drift")
_ITEM = re.compile(
    r"^(?P<kind>[a-z_]+)(?::(?P<who>\d+%?|group=[\w.-]+))?"
    r"(?:@(?P<when>[\d.]+(?:ms|s|m)?))?(?:=(?P<arg>.+))?$"
)
_RATE = re.compile(r"^(?P<n>[\d.]+)\s*(?P<unit>[kKmM]?)(?:B|b)?(?:/s)?$")
_ACCEPTED = (
    "accepted: KIND[:COUNT|PCT%|group=G][@SECONDS][=ARG] with KIND one of "
    + ", ".join(KINDS)
    + ' (e.g. "drop_link:10%@5s,slow_link:5%=64kB/s,crash:2@10s,corrupt:1=3")'
)


@dataclass(frozen=True)
class Fault:
    kind: str
    who: str  # "3", "10%" or "group=gpu"
    at: float  # seconds after start
    arg: (
        float  # corrupt: chunks; slow_link: bytes/s; crash: reboot after s (<0 never); drift: shift
    )
    scale: float = 1.0  # drift: input scale

    def count(self, fleet_size: int) -> int:
        if self.who.startswith("group="):
            raise InvalidArgument(f"fault {self.kind}:{self.who} names a group, not a count")
        if self.who.endswith("%"):
            return max(1, round(fleet_size * float(self.who[:-1]) / 100))
        return min(int(self.who), fleet_size)

    def pick(
        self, ids: Sequence[str], seed: int, *, groups: Mapping[str, str] | None = None
    ) -> list[str]:
        """The devices this fault hits (deterministic for a seed and fault); `groups` maps
        device ids to their group, for ``group=G``."""
        if self.who.startswith("group="):
            name = self.who.removeprefix("group=")
            hit = sorted(i for i in ids if (groups or {}).get(i) == name)
            if not hit:
                known = ", ".join(sorted(set((groups or {}).values()))) or "none"
                raise InvalidArgument(
                    f"fault {self.kind}:{self.who}: no simulated device in group {name!r}; "
                    f"groups: {known}"
                )
            return hit
        rng = random.Random(f"{seed}:{self.kind}:{self.who}:{self.at}")
        return sorted(rng.sample(list(ids), self.count(len(ids))))


def _seconds(text: str, item: str = "") -> float:
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    if text.endswith("m"):
        return float(text[:-1]) * 60
    return float(text.rstrip("s"))


def _rate(text: str, item: str) -> float:
    m = _RATE.match(text.strip())
    if not m:
        raise InvalidArgument(
            f"fault {item!r}: rate {text!r} not understood; accepted e.g. 64kB/s, 1MB/s, 20000"
        )
    scale = {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}[m.group("unit")]
    value = float(m.group("n")) * scale
    if value <= 0:
        raise InvalidArgument(f"fault {item!r}: rate must be > 0")
    return value


def _drift(text: str | None, item: str) -> tuple[float, float]:
    """(shift, scale) from ``SHIFT``, ``xSCALE`` or ``SHIFTxSCALE``."""
    if not text:
        return 4.0, 1.0
    shift_text, sep, scale_text = text.partition("x")
    try:
        shift = float(shift_text) if shift_text else 0.0
        scale = float(scale_text) if sep else 1.0
    except ValueError:
        raise InvalidArgument(
            f"fault {item!r}: drift takes SHIFT, xSCALE or SHIFTxSCALE, e.g. =4, =x1.5, =2x0.5"
        ) from None
    if scale <= 0:
        raise InvalidArgument(f"fault {item!r}: drift scale {scale:g} must be > 0")
    return shift, scale


def parse_faults(spec: str) -> list[Fault]:
    """Parse a comma-separated fault plan; `InvalidArgument` naming the bad item."""
    out: list[Fault] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _ITEM.match(item)
        if not m:
            raise InvalidArgument(f"fault {item!r} not understood; {_ACCEPTED}")
        kind = m.group("kind")
        if kind not in KINDS:
            raise InvalidArgument(f"fault kind {kind!r} in {item!r} unknown; {_ACCEPTED}")
        who = m.group("who") or "1"
        if who.endswith("%") and not 0 < float(who[:-1]) <= 100:
            raise InvalidArgument(f"fault {item!r}: share {who} must be in (0, 100]%")
        if who == "0":
            raise InvalidArgument(f"fault {item!r}: device count must be >= 1")
        at = _seconds(m.group("when")) if m.group("when") else 0.0
        arg_text = m.group("arg")
        scale = 1.0
        if kind == "drift":
            arg, scale = _drift(arg_text, item)
        elif kind == "slow_link":
            if not arg_text:
                raise InvalidArgument(f"fault {item!r}: slow_link needs a rate, e.g. =64kB/s")
            arg = _rate(arg_text, item)
        elif kind in ("corrupt", "lose"):
            if arg_text and not arg_text.isdigit():
                raise InvalidArgument(f"fault {item!r}: {kind} takes a chunk count, e.g. =3")
            arg = float(arg_text or 1)
        elif kind == "crash":
            if arg_text == "never":
                arg = -1.0
            else:
                try:
                    arg = _seconds(arg_text, item) if arg_text else 2.0
                except ValueError:
                    raise InvalidArgument(
                        f"fault {item!r}: crash takes a reboot delay (=3s) or =never"
                    ) from None
        elif arg_text:
            raise InvalidArgument(f"fault {item!r}: {kind} takes no =ARG")
        else:
            arg = 0.0
        out.append(Fault(kind, who, at, arg, scale))
    return sorted(out, key=lambda f: f.at)


__all__ = ["KINDS", "Fault", "parse_faults"]
