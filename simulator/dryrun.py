"""`fleet deploy REF --dry-run --sim N`: try a rollout policy on N simulated devices.

Everything is real except the devices' hardware: a private Mosquitto on loopback, a
throwaway device/rollout database, the coordinator and its rollout controller, and
N real agents (`SimulatedFleet`) that first run the baseline version (the model's
production version, else the one before REF), then receive live traffic with labels
(the baseline's holdout set) while the rollout runs with the given policy. The
registry and the artifact store are only read. The result says how long each stage
took, what each gate measured, whether the rollout was rolled back and how long it
took until every device served the baseline again, and what the coordinator sent.

The run is in real time: a 60 s bake takes 60 s per stage.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.cloud.config import CloudSettings
from edgefleet.cloud.devices import Selector
from edgefleet.cloud.registry import ModelRef, ModelVersion, RegistryStore
from edgefleet.cloud.rollouts import Policy, Rollout
from edgefleet.protos.errors import InvalidArgument

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class SimResult:
    ref: str
    baseline: str
    devices: int
    profile: str
    policy: Policy
    rollout: Rollout | None = None
    startup_s: float = 0.0
    baseline_s: float = 0.0
    elapsed_s: float = 0.0
    #: from the failed gate (or the rollback by hand) until every device served the baseline
    rollback_s: float | None = None
    egress_bytes: int = 0
    artifact_bytes: int = 0
    final_versions: dict[str, int] = field(default_factory=dict)

    def stages(self) -> list[dict[str, Any]]:
        r = self.rollout
        if r is None:
            return []
        out = []
        for s in r.stages:
            out.append(
                {
                    "name": s.name,
                    "devices": s.devices,
                    "state": s.state,
                    "install_s": _span(s.started_at, s.bake_started_at),
                    "bake_s": _span(s.bake_started_at, s.activated_at or s.finished_at),
                    "activate_s": _span(s.activated_at, s.finished_at),
                    "total_s": _span(s.started_at, s.finished_at),
                    "samples": s.samples,
                    "gates": [g.to_dict() for g in s.gates],
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        r = self.rollout
        return {
            "ref": self.ref,
            "baseline": self.baseline,
            "devices": self.devices,
            "profile": self.profile,
            "policy": self.policy.to_dict(),
            "outcome": r.state if r else None,
            "reason": r.reason if r else "",
            "stages": self.stages(),
            "startup_s": round(self.startup_s, 2),
            "baseline_s": round(self.baseline_s, 2),
            "elapsed_s": round(self.elapsed_s, 2),
            "rollback_s": None if self.rollback_s is None else round(self.rollback_s, 2),
            "egress_bytes": self.egress_bytes,
            "artifact_bytes": self.artifact_bytes,
            "final_versions": self.final_versions,
        }


def _span(a: float, b: float) -> float | None:
    return round(b - a, 2) if a and b and b >= a else None


def pick_baseline(registry: RegistryStore, target: ModelVersion) -> ModelVersion:
    """The version devices run before the rollout: production, else the one before."""
    for mv in registry.list_versions(target.model):
        if mv.stage == "production" and mv.version != target.version:
            return mv
    if target.version > 1:
        return registry.get_version(ModelRef(target.model, target.version - 1))
    raise InvalidArgument(
        f"--sim needs a version for the simulated devices to run before {target.ref}: "
        "promote one to production or deploy a later version"
    )


def simulate(
    settings: CloudSettings,
    ref: ModelRef,
    selector: Selector,
    policy: Policy,
    *,
    devices: int,
    profile: str = "mixed",
    rate: float = 10.0,
    progress: Progress = lambda _line: None,
    work_dir: Path | None = None,
) -> SimResult:
    """Run the rollout on `devices` simulated agents; blocking (its own event loop)."""
    if selector.kind != "all":
        progress(f"note: --to {selector} names real devices; the simulation targets all {devices}")
    tmp = Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=work_dir))
    try:
        return asyncio.run(
            _simulate(
                settings,
                ref,
                policy,
                tmp,
                devices=devices,
                profile=profile,
                rate=rate,
                progress=progress,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _simulate(
    settings: CloudSettings,
    ref: ModelRef,
    policy: Policy,
    tmp: Path,
    *,
    devices: int,
    profile: str,
    rate: float,
    progress: Progress,
) -> SimResult:
    from edgefleet.cloud.broker import ManagedBroker
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.coordinator import Coordinator
    from edgefleet.cloud.devices import DeviceStore
    from edgefleet.cloud.evaluation import EvalSet
    from edgefleet.cloud.identity import IdentityStore, write_broker_material
    from edgefleet.cloud.rollouts import RolloutStore
    from edgefleet.cloud.rollouts.controller import RolloutController
    from edgefleet.cloud.signing import load_private_key
    from edgefleet.protos.topics import Topics
    from edgefleet.protos.transport import MqttAccess
    from edgefleet.simulator.cluster import SimCluster
    from edgefleet.simulator.plan import device_specs

    client = LocalClient(settings)
    registry, store = client.registry, client.pipeline.store
    target = registry.get_version(ref)
    base = pick_baseline(registry, target)
    result = SimResult(target.ref, base.ref, devices, profile, policy)
    if base.evalset_sha256 is None:
        raise InvalidArgument(f"{base.ref} has no holdout set to draw simulated traffic from")
    ev = EvalSet.from_bytes(store.get(base.evalset_sha256))
    db = f"sqlite:///{tmp / 'sim.db'}"
    dev_store, rollouts = DeviceStore(db), RolloutStore(db)
    # identities on, as in `fleet serve`: a throwaway CA and credentials for this run
    identities = IdentityStore(tmp / "identities")
    auth_dir = tmp / "broker" / "auth"
    broker = ManagedBroker(
        tmp / "broker", auth=write_broker_material(identities, auth_dir, topics=Topics())
    )
    own = identities.coordinator()
    coordinator_access = MqttAccess(
        broker.coordinator_url, username=own.username, password=own.password
    )
    t0 = time.monotonic()
    try:
        # real agents in worker processes (one per ~250 devices, at most one per core)
        fleet = SimCluster(
            devices,
            broker_url=broker.url,
            public_key_pem=settings.public_key_path.read_text(),
            state_root=tmp / "devices",
            profile=profile,
            want_interval=1.0,
        )
        dev_store.enroll_many(device_specs(fleet.ids_for_enrollment()))
        issued = identities.enroll_many(e.device_id for e in fleet.ids_for_enrollment())
        fleet.credentials.update({d: c.password for d, c in issued.items()})
        write_broker_material(identities, auth_dir, topics=Topics())
        await asyncio.to_thread(broker.start)
        progress(f"starting {devices} simulated devices ({profile})")
        async with (
            fleet,
            Coordinator(
                broker_url=coordinator_access,
                registry=registry,
                store=store,
                devices=dev_store,
                signing_key=lambda: load_private_key(settings.signing_key_path),
            ) as coord,
        ):
            result.startup_s = time.monotonic() - t0
            everyone = Selector("all")
            while len(await asyncio.to_thread(dev_store.find, online=True)) < devices:
                await asyncio.sleep(0.2)
            progress(f"devices online in {result.startup_s:.1f}s; installing baseline {base.ref}")
            controller = RolloutController(coord, rollouts)
            task = asyncio.create_task(controller.run())
            data = tmp / "traffic.npz"
            arrays: dict[str, Any] = {"X": ev.x} if ev.y is None else {"X": ev.x, "y": ev.y}
            np.savez(data, **arrays)
            try:
                t1 = time.monotonic()
                # the baseline is a plain deploy: a one-stage rollout like any other
                first, _devs = await controller.create(
                    ModelRef(base.model, base.version), everyone, Policy.all_at_once()
                )
                done = await _follow(rollouts, first.rollout_id, lambda _line: None)
                if done.state != "done":
                    raise InvalidArgument(f"the simulated devices could not install {base.ref}")
                await _until_all_on(fleet, base.ref, devices, timeout=300)
                result.baseline_s = time.monotonic() - t1
                await fleet.traffic(data, rate=rate)
                t2 = time.monotonic()
                r, _devs = await controller.create(ref, everyone, policy)
                progress(f"rollout {r.rollout_id}: {policy.describe()}")
                r = await _follow(rollouts, r.rollout_id, progress)
                if r.state in ("rolling_back", "rolled_back"):
                    failed = [s for s in r.stages if s.state == "failed"]
                    failed_at = failed[-1].finished_at if failed else r.updated_at
                    await _until_all_on(fleet, base.ref, devices, timeout=300)
                    result.rollback_s = time.time() - failed_at
                    r = await _follow(rollouts, r.rollout_id, progress)
                result.elapsed_s = time.monotonic() - t2
            finally:
                await fleet.traffic(data, rate=0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            result.rollout = r
            shas = {v.sha256 for v in target.variants}
            for sha in shas:
                if coord.broadcaster.known(sha):
                    st = coord.broadcaster.stats(sha)
                    result.egress_bytes += st.bytes_sent
                    if st.bytes_sent:
                        result.artifact_bytes += st.size
            for ref_, count in fleet.active_versions().items():
                v = ref_.rpartition(":")[2]
                result.final_versions[v] = result.final_versions.get(v, 0) + count
    finally:
        await asyncio.to_thread(broker.stop)
        rollouts.close()
        dev_store.close()
        client.close()
    return result


async def _follow(store: Any, rollout_id: str, progress: Progress) -> Rollout:
    """Wait for the rollout to be final or paused, reporting stage changes."""
    seen: tuple[str, str, str] | None = None
    while True:
        r: Rollout = await asyncio.to_thread(store.get, rollout_id)
        now = (r.state, r.current.name, r.current.state)
        if now != seen:
            seen = now
            progress(f"  {r.state}: {r.current.name} {r.current.state}")
        if r.final or r.state == "paused":
            return r
        await asyncio.sleep(0.2)


async def _until_all_on(fleet: Any, ref: str, n: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet.active_versions().get(ref, 0) >= n:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not every simulated device back on {ref} in {timeout:.0f}s")


def print_simulation(console: Any, res: SimResult) -> None:
    from rich.table import Table

    r = res.rollout
    console.print(
        f"[bold]simulated[/bold] {res.ref} on {res.devices} {res.profile} devices "
        f"(baseline {res.baseline}); {res.policy.describe()}"
    )
    t = Table(box=None, pad_edge=False)
    for col in ("STAGE", "DEVICES", "STATE", "INSTALL", "BAKE", "ACTIVATE", "TOTAL", "GATES"):
        t.add_column(col)

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}s"

    for s in res.stages():
        gates = "  ".join(
            f"{'✓' if g['ok'] else '✗'} {g['name']} {g['value']:.3g}" for g in s["gates"]
        )
        t.add_row(
            s["name"],
            str(s["devices"]),
            s["state"],
            sec(s["install_s"]),
            sec(s["bake_s"]),
            sec(s["activate_s"]),
            sec(s["total_s"]),
            gates,
        )
    console.print(t)
    if r is not None:
        console.print(f"outcome: {r.state}" + (f" ({r.reason})" if r.reason else ""))
    if res.rollback_s is not None:
        console.print(f"every device back on {res.baseline} {res.rollback_s:.1f}s after the gate")
    console.print(
        f"coordinator sent {res.egress_bytes / 1e6:.2f} MB of {res.ref} "
        f"({res.artifact_bytes / 1e6:.2f} MB of artifacts); run took {res.elapsed_s:.1f}s; "
        f"devices now on versions {res.final_versions}"
    )
