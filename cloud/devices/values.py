"""What the coordinator knows about a device, as typed values.

A device's capabilities (from its birth message), the model it serves and its last
reported update state are decoded once at the edge (`cloud.inbound` for MQTT,
`cloud.api.convert` for gRPC), kept in typed columns (`cloud.devices.store`) and read
as these frozen values everywhere else: no reader fishes in a dict.

`UpdateState` and `ReasonCode` mirror ``fleet.v1.UpdateState`` / ``fleet.v1.ReasonCode``
(value: the lower-case name without the prefix, which is also what the database keeps
and `fleet devices ls --state` accepts); `cloud.api.convert` maps them to and from the
protobuf numbers with one table each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class UpdateState(StrEnum):
    """A device's update state machine (docs/protocol.md)."""

    UNSPECIFIED = "unspecified"
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    LOADING = "loading"
    SELF_TEST = "self_test"
    ACTIVE = "active"  # desired generation is serving
    FAILED = "failed"  # rejected; previous model keeps serving
    ROLLED_BACK = "rolled_back"  # last-known-good reactivated (or a shadow dropped)
    SHADOWING = "shadowing"  # candidate loaded beside the active model


class ReasonCode(StrEnum):
    """Why a device is in its state: stable codes for gates and operators."""

    UNSPECIFIED = "unspecified"
    OK = "ok"
    BAD_SIGNATURE = "bad_signature"
    CHUNK_DIGEST_MISMATCH = "chunk_digest_mismatch"
    ARTIFACT_DIGEST_MISMATCH = "artifact_digest_mismatch"
    TRUNCATED = "truncated"
    MALFORMED_MESSAGE = "malformed_message"
    UNKNOWN_VARIANT = "unknown_variant"
    UNSUPPORTED_RUNTIME = "unsupported_runtime"
    LOAD_FAILED = "load_failed"
    SELF_TEST_FAILED = "self_test_failed"
    DISK_FULL = "disk_full"
    STALE_GENERATION = "stale_generation"
    NO_LAST_KNOWN_GOOD = "no_last_known_good"
    EXPIRED = "expired"
    KEY_REVOKED = "key_revoked"
    UNTRUSTED_KEY = "untrusted_key"
    OFFLINE_INSTALL = "offline_install"
    DELTA_NO_BASE = "delta_no_base"
    DELTA_FAILED = "delta_failed"
    AGENT_INSTALL_FAILED = "agent_install_failed"
    AGENT_CHECK_FAILED = "agent_check_failed"
    AGENT_UNHEALTHY = "agent_unhealthy"
    AGENT_PLATFORM = "agent_platform"


class Accelerator(StrEnum):
    """Class of a device's best execution provider."""

    CPU = "cpu"
    GPU = "gpu"
    NPU = "npu"


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model variant on a device (``fleet.v1.ModelRef``): what it serves, served
    before, or keeps as last-known-good."""

    model: str
    version: int
    variant: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.model}:{self.version}/{self.variant}"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device can run, as it measured at start (its birth message)."""

    machine: str
    runtimes: tuple[str, ...]
    providers: tuple[str, ...]
    accelerator: Accelerator
    memory_mb: int
    tflite_runtime_legacy: bool = False
    features: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reported:
    """A device's last reported update state (``fleet.v1.ReportedState``)."""

    device_id: str
    generation: int
    state: UpdateState
    reason: ReasonCode
    detail: str = ""
    active: ServedModel | None = None
    last_known_good: ServedModel | None = None
    chunks_have: int = 0
    chunks_total: int = 0
    provider: str = ""
    timestamp_ms: int = 0


__all__ = ["Accelerator", "Capabilities", "ReasonCode", "Reported", "ServedModel", "UpdateState"]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device to enrol: its id, group (for selectors) and tags."""

    device_id: str
    group: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
