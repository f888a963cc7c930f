"""An in-memory `RolloutFleet` for the rollout controller's unit tests.

Devices answer each desired state the way the test tells them (`FakeDevice.answers`:
action -> reported state, or nothing for a device that stays silent), at once, as
their agent would report it; a shadowing device publishes the shadow summary the test
gave it. Desired states are "signed" as JSON the fake reads back, so a test can see
every (device, generation, action) the controller issued. Versions are in memory.
`changed()` advances the test's clock instead of waiting, so `RolloutController.run`
moves through bakes and timeouts without sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgefleet.cloud.devices import Device, Selector
from edgefleet.cloud.devices.store import Sign
from edgefleet.cloud.devices.values import (
    Accelerator,
    Capabilities,
    ReasonCode,
    Reported,
    ServedModel,
    UpdateState,
)
from edgefleet.cloud.inbound import ShadowReport
from edgefleet.cloud.registry import Lineage, ModelRef, ModelVersion, Variant
from edgefleet.cloud.selection import Plan
from edgefleet.protos.errors import NotFound

#: what an agent reports once it carried out each action
OK = {
    "shadow": UpdateState.SHADOWING,
    "activate": UpdateState.ACTIVE,
    "rollback": UpdateState.ROLLED_BACK,
}
#: a shadow evaluation that passes every quality gate the tests use
GOOD_SHADOW: Mapping[str, float] = {
    "samples": 50.0,
    "agreed": 50.0,
    "active_p50_us": 1000.0,
    "candidate_p50_us": 1000.0,
    "candidate_memory_mb": 10.0,
}


class Clock:
    """The controller's injectable clock: moves only when a test (or `changed`) says."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Issued:
    device_id: str
    generation: int
    action: str
    rollout_id: str
    sha256: str


@dataclass
class FakeDevice:
    device_id: str
    group: str = "lab"
    online: bool = True
    active: ServedModel | None = None
    reported: Reported | None = None
    #: action -> state it reports ("failed" included); a missing action: silent
    answers: dict[str, UpdateState] = field(default_factory=lambda: dict(OK))
    reason: ReasonCode = ReasonCode.UNSPECIFIED
    shadow: Mapping[str, float] = field(default_factory=lambda: dict(GOOD_SHADOW))
    received: list[Issued] = field(default_factory=list)


def variant(model: str, version: int, name: str = "fp32") -> Variant:
    manifest = f"manifest {model}:{version} {name}".encode()
    return Variant(
        name=name,
        runtime="onnxruntime",
        sha256=hashlib.sha256(manifest).hexdigest(),
        size=len(manifest),
        accuracy=0.9,
        latency_ms={},
        quantization={},
        deployable=True,
        reason="",
        signed_manifest=manifest,
    )


def model_version(model: str, version: int) -> ModelVersion:
    return ModelVersion(
        arch="mlp",
        inputs=(),
        outputs=(),
        classes=(),
        metrics={},
        lineage=Lineage(source="train"),
        checkpoint_sha256=None,
        evalset_sha256=None,
        model=model,
        version=version,
        variants=(variant(model, version),),
    )


class FakeFleet:
    """Satisfies `edgefleet.cloud.rollouts.fleet.RolloutFleet` (mypy checks it)."""

    def __init__(self, clock: Clock, *, step_s: float = 1.0) -> None:
        self.clock = clock
        self.step_s = step_s
        self.devices: dict[str, FakeDevice] = {}
        self.versions: dict[tuple[str, int], ModelVersion] = {}
        self.reports: dict[str, ShadowReport] = {}
        self.prepared: set[str] = set()

    # -- test set-up -------------------------------------------------------------------

    def add_version(self, model: str, version: int) -> ModelVersion:
        mv = model_version(model, version)
        self.versions[(model, version)] = mv
        return mv

    def add_device(self, device_id: str, *, serving: ModelVersion, **kw: Any) -> FakeDevice:
        v = serving.variants[0]
        active = ServedModel(serving.model, serving.version, v.name, v.sha256)
        dev = FakeDevice(device_id, active=active, **kw)
        self.devices[device_id] = dev
        return dev

    def issued(self, device_id: str, action: str | None = None) -> list[Issued]:
        return [i for i in self.devices[device_id].received if action in (None, i.action)]

    def serving(self, device_id: str) -> int:
        active = self.devices[device_id].active
        return active.version if active is not None else 0

    # -- RolloutFleet ------------------------------------------------------------------

    async def plan(self, ref: ModelRef, selector: Selector) -> Plan:
        mv = await self.get_version(ref)
        targets = [
            (self._device(d), mv.variants[0])
            for d in self.devices.values()
            if selector.matches(d.device_id, d.group, {})
        ]
        return Plan(mv, targets, {})

    async def get_version(self, ref: ModelRef) -> ModelVersion:
        mv = self.versions.get((ref.name, ref.version or 0))
        if mv is None:
            raise NotFound(f"model {ref} not found")
        return mv

    async def prepare(
        self, variants: Sequence[Variant], targets: Mapping[str, str] | None = None
    ) -> None:
        self.prepared |= {v.sha256 for v in variants}

    def signer(
        self,
        manifests: Mapping[str, tuple[bytes, str]],
        *,
        rollout_id: str,
        action: str,
        sample_rate: float = 1.0,
    ) -> Sign:
        def sign(device_id: str, generation: int) -> bytes:
            _raw, sha = manifests[device_id]
            doc = {"g": generation, "a": action, "r": rollout_id, "s": sha}
            return json.dumps(doc).encode()

        return sign

    async def publish_desired(self, signed: Mapping[str, bytes], *, window: int = 256) -> None:
        for device_id, payload in signed.items():
            doc = json.loads(payload)
            issued = Issued(device_id, doc["g"], doc["a"], doc["r"], doc["s"])
            self.devices[device_id].received.append(issued)
            self._answer(self.devices[device_id], issued)

    async def find_devices(self, device_ids: Sequence[str]) -> list[Device]:
        return [self._device(self.devices[d]) for d in device_ids if d in self.devices]

    def shadow_report(self, device_id: str) -> ShadowReport | None:
        return self.reports.get(device_id)

    async def changed(self, timeout: float) -> None:
        await asyncio.sleep(0)
        self.clock.advance(self.step_s)

    # -- the devices' side -------------------------------------------------------------

    def answer_again(self, device_id: str) -> None:
        """The device (back online, or told to answer now) acts on its latest desired state."""
        dev = self.devices[device_id]
        if dev.received:
            self._answer(dev, dev.received[-1])

    def _answer(self, dev: FakeDevice, issued: Issued) -> None:
        state = dev.answers.get(issued.action)
        if not state or not dev.online:
            return
        dev.reported = Reported(
            dev.device_id,
            issued.generation,
            state,
            dev.reason if state == UpdateState.FAILED else ReasonCode.UNSPECIFIED,
            f"{dev.device_id} {state}",
        )
        if state != OK[issued.action]:
            return
        if issued.action == "shadow":
            self.reports[dev.device_id] = ShadowReport(
                dev.device_id, issued.generation, issued.rollout_id, dict(dev.shadow)
            )
        else:
            mv = next(mv for mv in self.versions.values() if mv.variants[0].sha256 == issued.sha256)
            dev.active = ServedModel(mv.model, mv.version, mv.variants[0].name, issued.sha256)

    def set_shadow(self, device_id: str, summary: Mapping[str, float]) -> None:
        """A device's shadow evaluation changes (more samples came in)."""
        dev = self.devices[device_id]
        dev.shadow = dict(summary)
        old = self.reports.get(device_id)
        if old is not None:
            self.reports[device_id] = ShadowReport(
                device_id, old.generation, old.rollout_id, dict(summary)
            )

    def _device(self, d: FakeDevice) -> Device:
        seen = datetime.fromtimestamp(self.clock(), UTC)
        return Device(
            device_id=d.device_id,
            group=d.group,
            tags={},
            enrolled_at=seen,
            online=d.online,
            last_seen=seen if d.online else None,
            agent_version="test",
            capabilities=Capabilities("x86_64", ("onnxruntime",), (), Accelerator.CPU, 1024),
            active=d.active,
            reported=d.reported,
            desired_generation=0,
            rollout_id="",
        )
