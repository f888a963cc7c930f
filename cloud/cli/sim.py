"""`fleet sim`: run simulated devices (real agent code) against a running coordinator.

The devices are enrolled through the coordinator like real ones, then run in
`simulator.worker` child processes (`simulator.cluster.SimCluster`); this process
only enrols, watches and injects faults, so the CLI never imports agent code.
The enrolment answer (broker URL, signing key) is kept in the state directory, so
a second `fleet sim` with the same directory reuses the same devices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cloud.cli.context import coordinator_of, settings_of
from edgefleet.cloud.cli.enrol import DEFAULT_BATCH
from edgefleet.cloud.cli.output import emit_json
from edgefleet.protos.errors import Conflict, Unavailable

if TYPE_CHECKING:
    from edgefleet.cloud.services.api import FleetClient
    from edgefleet.simulator.cluster import SimCluster
    from edgefleet.simulator.faults import Fault

logger = logging.getLogger(__name__)

BUNDLE_FILE = "enrollment.json"
CREDENTIALS_FILE = "credentials.json"


def _enroll(client: FleetClient, plan: list[Any], state_dir: Path) -> dict[str, Any]:
    """Enrol every planned device not enrolled yet; the bundle fields they share, and
    under "passwords" each device's MQTT password (kept in STATE_DIR, mode 0600)."""
    from edgefleet.cloud.devices import DeviceSpec

    cached = state_dir / BUNDLE_FILE
    secrets = state_dir / CREDENTIALS_FILE
    shared: dict[str, Any] | None = None
    if cached.exists():
        shared = json.loads(cached.read_text())
    passwords: dict[str, str] = json.loads(secrets.read_text()) if secrets.exists() else {}
    known: list[str] = []
    # in batches (one credential write and one broker reload each); devices enrolled by
    # an earlier run with this state directory are left as they are
    for i in range(0, len(plan), DEFAULT_BATCH):
        specs = [
            DeviceSpec(e.device_id, e.group, dict(e.tags)) for e in plan[i : i + DEFAULT_BATCH]
        ]
        batch = client.enroll_devices(specs, skip_existing=True)
        known += batch.existing
        for b in batch.bundles:
            if b.password:
                passwords[b.device_id] = b.password
            if shared is None:
                shared = {
                    "broker_url": b.broker_url,
                    "signing_public_key": b.signing_public_key,
                    "topic_prefix": b.topic_prefix,
                }
    if shared is None:
        raise Conflict(
            f"devices {known[0]} … {known[-1]} are already enrolled and {cached} holds no "
            "enrolment from an earlier run; pass that run's --state-dir or a new --id-prefix"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(shared, indent=2))
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(passwords, f)
    return {**shared, "passwords": passwords}


async def _run(
    sim: SimCluster,
    faults: list[Fault],
    *,
    seed: int,
    duration: float | None,
    until_active: int | None,
    as_json: bool,
    traffic: float = 0.0,
    labelled: float = 1.0,
    alpha: float = 10.0,
) -> dict[str, Any]:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console(stderr=True)
    events: list[dict[str, Any]] = []

    def on_fault(f: Fault, ids: list[str]) -> None:
        events.append({"fault": f.kind, "at_s": f.at, "devices": ids})
        if not as_json:
            console.print(
                f"fault {f.kind} @ {f.at:g}s on {len(ids)} device(s): {', '.join(ids[:5])}"
            )

    def table() -> Table:
        t = Table(title=f"{sim.n} simulated devices ({sim.processes} processes)")
        t.add_column("online", justify="right")
        for state in sorted(sim.states()):
            t.add_column(state, justify="right")
        t.add_column("serving")
        if traffic:
            t.add_column("predictions", justify="right")
        t.add_row(
            str(sim.online()),
            *(str(n) for _, n in sorted(sim.states().items())),
            ", ".join(f"{v}×{n}" for v, n in sorted(sim.active_variants().items())) or "-",
            *((f"{sim.predictions():,}",) if traffic else ()),
        )
        return t

    start = time.monotonic()
    async with sim:
        if traffic:
            await sim.partition_traffic(rate=traffic, labelled=labelled, alpha=alpha, seed=seed)
            if not as_json:
                console.print(
                    f"live traffic: {traffic:g} predictions/s per device from its own data "
                    f"partition, {labelled:.0%} labelled"
                )
        injector = asyncio.create_task(sim.run_faults(faults, seed=seed, on_fault=on_fault))
        try:
            with Live(table(), console=console, refresh_per_second=4, transient=as_json) as live:
                while True:
                    if injector.done() and (err := injector.exception()) is not None:
                        raise err
                    if until_active is not None and sim.states().get("active", 0) >= until_active:
                        break
                    if duration is not None and time.monotonic() - start >= duration:
                        break
                    if failed := sim.failed_workers():
                        raise Unavailable(f"simulator workers stopped: {'; '.join(failed)}")
                    live.update(table())
                    await asyncio.sleep(0.25)
                live.update(table())
        finally:
            injector.cancel()
            await asyncio.gather(injector, return_exceptions=True)
        return {
            "devices": sim.n,
            "processes": sim.processes,
            "seconds": round(time.monotonic() - start, 2),
            "online": sim.online(),
            "states": dict(sim.states()),
            "variants": dict(sim.active_variants()),
            "predictions": sim.predictions(),
            "faults": events,
        }


def sim(
    ctx: typer.Context,
    devices: Annotated[int, typer.Option("--devices", "-n", help="How many devices.", min=1)] = 20,
    profile: Annotated[
        str,
        typer.Option(
            help="Hardware profile: cpu, gpu, npu, litert, armv7, the mix 'mixed', or "
            "profiles in equal shares, e.g. 'cpu,gpu'. Each device's group is its profile."
        ),
    ] = "mixed",
    processes: Annotated[
        int | None,
        typer.Option(help="Simulator processes (default: one per ~250 devices, ≤ cores).", min=1),
    ] = None,
    faults: Annotated[
        str,
        typer.Option(
            help="Fault plan, e.g. 'drop_link:10%@5s,slow_link:5%=64kB/s,crash:2@10s,corrupt:1=3'; "
            "'drift:group=gpu@30s=4' shifts the live inputs of every gpu device by 4."
        ),
    ] = "",
    traffic: Annotated[
        float,
        typer.Option(
            "--traffic",
            metavar="RATE",
            min=0,
            help="Live predictions per second per device, from the device's own data "
            "partition (digits, non-IID), through its real model; 0: none.",
        ),
    ] = 0.0,
    labelled: Annotated[
        float,
        typer.Option(
            "--labelled",
            metavar="FRACTION",
            min=0,
            max=1,
            help="Share of the live predictions that carry their label (for --min-accuracy).",
        ),
    ] = 1.0,
    alpha: Annotated[
        float,
        typer.Option(
            "--alpha",
            min=0.01,
            help="Label skew of the devices' data partitions (Dirichlet alpha): 0.1 each "
            "device sees one or two classes, 100 nearly the same mix. Strong skew looks like "
            "drift against the training data.",
        ),
    ] = 10.0,
    telemetry_interval: Annotated[
        float,
        typer.Option(
            "--telemetry-interval",
            min=0.1,
            help="Seconds between each device's telemetry (latency, drift sketches).",
        ),
    ] = 10.0,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C).")
    ] = None,
    until_active: Annotated[
        int | None,
        typer.Option("--until-active", help="Stop once this many devices serve a model.", min=1),
    ] = None,
    id_prefix: Annotated[str, typer.Option(help="Device ids are PREFIX-0000, PREFIX-0001, …")] = (
        "sim"
    ),
    seed: Annotated[int, typer.Option(help="Seed for profiles and fault targets.")] = 0,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Where the devices keep their state (default FLEET_HOME/sim/PREFIX)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary at the end.")] = (
        False
    ),
    share_sessions: Annotated[
        bool,
        typer.Option(
            "--share-sessions",
            help="Devices in one simulator process that load the same model bytes share one "
            "ONNX Runtime session (each still downloads, verifies and self-tests); for "
            "fleets whose per-device sessions would not fit in memory.",
        ),
    ] = False,
) -> None:
    """Run simulated devices (real agent code) against the running coordinator."""
    from edgefleet.simulator.cluster import SimCluster
    from edgefleet.simulator.faults import parse_faults
    from edgefleet.simulator.plan import plan

    plan_ = plan(devices, profile, seed=seed, id_prefix=id_prefix)  # validates early
    fault_plan = parse_faults(faults)
    client = coordinator_of(ctx)
    root = state_dir or settings_of(ctx).home_dir / "sim" / id_prefix
    shared = _enroll(client, plan_, root)
    cluster = SimCluster(
        devices,
        broker_url=shared["broker_url"],
        public_key_pem=shared["signing_public_key"],
        state_root=root,
        processes=processes,
        profile=profile,
        seed=seed,
        topic_prefix=shared.get("topic_prefix", "ef/v1"),
        id_prefix=id_prefix,
        credentials=shared["passwords"] or None,
        telemetry_interval=telemetry_interval,
        share_sessions=share_sessions,
    )
    try:
        summary = asyncio.run(
            _run(
                cluster,
                fault_plan,
                seed=seed,
                duration=duration,
                until_active=until_active,
                as_json=as_json,
                traffic=traffic,
                labelled=labelled,
                alpha=alpha,
            )
        )
    except KeyboardInterrupt:
        raise typer.Abort() from None
    if as_json:
        emit_json(summary)
