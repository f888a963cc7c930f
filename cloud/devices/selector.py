"""Device selectors as operators type them.

- ``all``
- ``group=G`` or ``group=G1,G2`` (any of them)
- ``tag=EXPR``: terms ``KEY=VALUE``, ``KEY!=VALUE`` or ``KEY`` (has the tag), joined by
  ``,`` (all of them) and ``|`` (any of the alternatives), e.g.
  ``tag=site=paris,tier=prod|site=lyon`` is (site=paris and tier=prod) or site=lyon
- ``device=ID[,ID…]``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.topics import check_device_id

ACCEPTED = (
    "all, group=G[,G2…], tag=KEY=VALUE (with ',' and, '|' or, KEY!=VALUE, KEY), device=ID[,ID…]"
)

#: one tag test: (key, op, value), op one of "=", "!=", "has"
Term = tuple[str, str, str]


def _term(text: str, whole: str) -> Term:
    t = text.strip()
    if "!=" in t:
        k, _, v = t.partition("!=")
        op = "!="
    elif "=" in t:
        k, _, v = t.partition("=")
        op = "="
    else:
        k, v, op = t, "", "has"
    k = k.strip()
    if not k:
        raise InvalidArgument(
            f"selector {whole!r}: tag term {text!r} needs KEY=VALUE, KEY!=VALUE or KEY; "
            f"accepted: {ACCEPTED}"
        )
    return (k, op, v.strip())


@dataclass(frozen=True)
class Selector:
    kind: str  # all | group | tag | device
    groups: tuple[str, ...] = ()
    tags: tuple[tuple[Term, ...], ...] = ()  # any of these, each all of its terms
    devices: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selector:
        text = text.strip()
        if text == "all":
            return cls("all")
        key, sep, value = text.partition("=")
        if not sep or not value.strip():
            raise InvalidArgument(f"selector {text!r} not understood; accepted: {ACCEPTED}")
        if key == "group":
            groups = tuple(g.strip() for g in value.split(",") if g.strip())
            return cls("group", groups=groups)
        if key == "tag":
            alternatives = tuple(
                tuple(_term(t, text) for t in alt.split(",") if t.strip())
                for alt in value.split("|")
            )
            if any(not alt for alt in alternatives):
                raise InvalidArgument(
                    f"selector {text!r}: empty alternative around '|'; accepted: {ACCEPTED}"
                )
            return cls("tag", tags=alternatives)
        if key == "device":
            ids = tuple(check_device_id(d.strip()) for d in value.split(",") if d.strip())
            return cls("device", devices=ids)
        raise InvalidArgument(f"selector {text!r}: {key!r} unknown; accepted: {ACCEPTED}")

    def matches(self, device_id: str, group: str, tags: Mapping[str, str]) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "group":
            return group in self.groups
        if self.kind == "tag":
            return any(all(_test(term, tags) for term in alt) for alt in self.tags)
        return device_id in self.devices

    def __str__(self) -> str:
        if self.kind == "group":
            return "group=" + ",".join(self.groups)
        if self.kind == "tag":
            return "tag=" + "|".join(",".join(_show(t) for t in alt) for alt in self.tags)
        if self.kind == "device":
            return "device=" + ",".join(self.devices)
        return "all"


def _test(term: Term, tags: Mapping[str, str]) -> bool:
    key, op, value = term
    if op == "has":
        return key in tags
    if op == "=":
        return tags.get(key) == value
    return tags.get(key) != value


def _show(term: Term) -> str:
    key, op, value = term
    return key if op == "has" else f"{key}{op}{value}"
