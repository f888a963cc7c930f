"""The MQTT topic tree (docs/protocol.md), built and parsed in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgefleet.protos.errors import InvalidArgument

PREFIX = "ef/v1"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEVICE_KINDS = ("status", "desired", "reported", "telemetry", "shadow", "ack")
ARTIFACT_KINDS = ("want", "chunk")


def check_device_id(device_id: str) -> str:
    if not _DEVICE_ID.match(device_id):
        raise InvalidArgument(f"device id {device_id!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return device_id


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (tests use their own prefix per test)."""

    prefix: str = PREFIX

    def device(self, device_id: str, kind: str) -> str:
        if kind not in DEVICE_KINDS:
            raise InvalidArgument(
                f"device topic kind {kind!r}; accepted: {', '.join(DEVICE_KINDS)}"
            )
        return f"{self.prefix}/dev/{check_device_id(device_id)}/{kind}"

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def desired(self, device_id: str) -> str:
        return self.device(device_id, "desired")

    def reported(self, device_id: str) -> str:
        return self.device(device_id, "reported")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def shadow(self, device_id: str) -> str:
        return self.device(device_id, "shadow")

    def ack(self, device_id: str) -> str:
        """Coordinator -> device: which telemetry windows are committed (not retained)."""
        return self.device(device_id, "ack")

    def artifact(self, sha256: str, kind: str) -> str:
        if kind not in ARTIFACT_KINDS:
            raise InvalidArgument(
                f"artifact topic kind {kind!r}; accepted: {', '.join(ARTIFACT_KINDS)}"
            )
        if not _SHA256.match(sha256):
            raise InvalidArgument(f"artifact id {sha256!r} is not a sha256 hex digest")
        return f"{self.prefix}/art/{sha256}/{kind}"

    def want(self, sha256: str) -> str:
        return self.artifact(sha256, "want")

    def chunk(self, sha256: str) -> str:
        return self.artifact(sha256, "chunk")

    def keys(self) -> str:
        """The root-signed list of signing keys (retained; protos.keys)."""
        return f"{self.prefix}/keys"

    def all_devices(self, kind: str) -> str:
        """Wildcard filter over every device's `kind` topic."""
        return f"{self.prefix}/dev/+/{kind}"

    def all_wants(self) -> str:
        return f"{self.prefix}/art/+/want"

    def parse(self, topic: str) -> tuple[str, str, str]:
        """('dev'|'art', device id or sha256, kind) for a topic under this prefix."""
        if not topic.startswith(self.prefix + "/"):
            raise InvalidArgument(f"topic {topic!r} is not under {self.prefix!r}")
        parts = topic[len(self.prefix) + 1 :].split("/")
        if len(parts) != 3 or parts[0] not in ("dev", "art"):
            raise InvalidArgument(
                f"topic {topic!r}: expected {self.prefix}/dev/ID/KIND or {self.prefix}/art/SHA256/KIND"
            )
        space, ident, kind = parts
        kinds = DEVICE_KINDS if space == "dev" else ARTIFACT_KINDS
        if kind not in kinds:
            raise InvalidArgument(f"topic {topic!r}: kind {kind!r}; accepted: {', '.join(kinds)}")
        return space, ident, kind
