"""Values the application layer hands out, the same in-process and through `fleet serve`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgefleet.protos.errors import Unavailable

if TYPE_CHECKING:
    from edgefleet.cloud.replicas import ReplicaInfo

BUNDLE_FORMAT = "edgefleet-enrollment/v1"


@dataclass(frozen=True)
class InitResult:
    home: Path
    created_key: bool
    key_id: str
    registry: str
    artifacts: str
    config: Path
    created_token: bool = False
    root_key_id: str = ""
    created_root: bool = False


@dataclass(frozen=True)
class EnrollmentBundle:
    """Everything a device needs to join (fleet.v1.EnrollmentBundle as JSON)."""

    device_id: str
    broker_url: str
    signing_public_key: str  # PEM: the only key the device trusts
    topic_prefix: str = "ef/v1"
    group: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = None
    ca_certificate: str | None = None  # PEM, for mqtts:// with a private CA
    client_certificate: str | None = field(default=None, repr=False)  # PEM, CN = device id
    client_key: str | None = field(default=None, repr=False)  # PEM
    root_public_key: str = ""  # PEM: the root of the key list
    key_list: str = ""  # base64 SignedKeyList: the online keys the device accepts

    def to_json(self) -> dict[str, Any]:
        # FLEET_ADVERTISE_BROKER may name a cluster's nodes, comma-separated: the agent
        # fails over between them (docs/operators.md, clustered broker)
        urls = [u.strip() for u in self.broker_url.split(",") if u.strip()]
        return {
            "format": BUNDLE_FORMAT,
            "device_id": self.device_id,
            "broker_url": urls[0] if urls else self.broker_url,
            **({"broker_urls": urls} if len(urls) > 1 else {}),
            "username": self.username,
            "password": self.password,
            "signing_public_key": self.signing_public_key,
            "ca_certificate": self.ca_certificate,
            "client_certificate": self.client_certificate,
            "client_key": self.client_key,
            "topic_prefix": self.topic_prefix,
            "group": self.group,
            "tags": dict(self.tags),
            "root_public_key": self.root_public_key,
            "key_list": self.key_list,
        }


@dataclass(frozen=True)
class EnrolledBatch:
    """What `enroll_devices` did: a bundle per device enrolled now, in the order asked,
    and the ids left as they were because they were enrolled before (skip_existing)."""

    bundles: tuple[EnrollmentBundle, ...]
    existing: tuple[str, ...] = ()


class BatchCutOff(Unavailable):
    """An enrolment answer broke off after its first page: the coordinator enrolled (or
    reissued) the whole batch, but only `received`'s bundles arrived; `missing` lists
    the devices whose bundles did not (new ones: `fleet devices reissue`)."""

    def __init__(self, message: str, received: EnrolledBatch, missing: tuple[str, ...]) -> None:
        super().__init__(message)
        self.received = received
        self.missing = missing


@dataclass(frozen=True)
class FleetStatus:
    coordinator: str  # HOST:PORT, or "" when none is running
    coordinator_version: str
    broker_url: str
    devices: int
    online: int
    by_state: Mapping[str, int]
    #: `fleet serve --replica`: every replica with a row, the leader first
    replicas: tuple[ReplicaInfo, ...] = ()


class EpochProgress(Protocol):
    """One finished training epoch, as `train(on_epoch=…)` receives it (in-process the
    trainer's `EpochStat`, through a coordinator `EpochStat` below)."""

    @property
    def epoch(self) -> int: ...
    @property
    def epochs(self) -> int: ...
    @property
    def loss(self) -> float: ...
    @property
    def train_accuracy(self) -> float: ...


@dataclass(frozen=True)
class EpochStat:
    """An epoch's figures carried over FleetService (`Progress.fields`)."""

    epoch: int
    epochs: int
    loss: float
    train_accuracy: float
