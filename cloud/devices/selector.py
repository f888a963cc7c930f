"""Device selectors as operators type them: all, group=G, tag=k=v, device=ID[,ID…]."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protos.errors import InvalidArgument
from protos.topics import check_device_id

ACCEPTED = "all, group=G, tag=KEY=VALUE, device=ID[,ID…]"


@dataclass(frozen=True)
class Selector:
    kind: str  # all | group | tag | device
    group: str = ""
    tag: tuple[str, str] = ("", "")
    devices: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selector:
        text = text.strip()
        if text == "all":
            return cls("all")
        key, sep, value = text.partition("=")
        if not sep or not value:
            raise InvalidArgument(f"selector {text!r} not understood; accepted: {ACCEPTED}")
        if key == "group":
            return cls("group", group=value)
        if key == "tag":
            k, sep2, v = value.partition("=")
            if not sep2 or not k:
                raise InvalidArgument(
                    f"selector {text!r}: tag needs KEY=VALUE; accepted: {ACCEPTED}"
                )
            return cls("tag", tag=(k, v))
        if key == "device":
            ids = tuple(check_device_id(d.strip()) for d in value.split(",") if d.strip())
            return cls("device", devices=ids)
        raise InvalidArgument(f"selector {text!r}: {key!r} unknown; accepted: {ACCEPTED}")

    def matches(self, device_id: str, group: str, tags: Mapping[str, str]) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "group":
            return group == self.group
        if self.kind == "tag":
            return tags.get(self.tag[0]) == self.tag[1]
        return device_id in self.devices

    def __str__(self) -> str:
        if self.kind == "group":
            return f"group={self.group}"
        if self.kind == "tag":
            return f"tag={self.tag[0]}={self.tag[1]}"
        if self.kind == "device":
            return "device=" + ",".join(self.devices)
        return "all"
