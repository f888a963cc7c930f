"""`fleet`: the operator's command line.

Global options carry the settings (each with its FLEET_* variable); commands get a
`FleetClient` from the context and import anything heavy inside themselves.
Exit codes: 0 ok, 1 a FleetError (message on stderr), 2 usage.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet import __version__
from edgefleet.cloud.cli import agent_releases as agent_cli
from edgefleet.cloud.cli import audit as audit_cli
from edgefleet.cloud.cli import broker as broker_cli
from edgefleet.cloud.cli import db as db_cli
from edgefleet.cloud.cli import devices as devices_cli
from edgefleet.cloud.cli import drift as drift_cli
from edgefleet.cloud.cli import fl as fl_cli
from edgefleet.cloud.cli import keys as keys_cli
from edgefleet.cloud.cli import models as models_cli
from edgefleet.cloud.cli import report as report_cli
from edgefleet.cloud.cli import rollouts as rollouts_cli
from edgefleet.cloud.cli import sim as sim_cli
from edgefleet.cloud.cli import tokens as tokens_cli
from edgefleet.cloud.cli.context import State, client_of, coordinator_of, settings_of
from edgefleet.cloud.cli.output import (
    emit_json,
    err,
    out,
    print_status,
    print_version,
    status_json,
    version_json,
)
from edgefleet.cloud.cli.rollouts import watch_until_outcome
from edgefleet.cloud.quiet import quiet_third_party
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.signing import is_encrypted
from edgefleet.protos.errors import FleetError, InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Sequence

    from edgefleet.cloud.devices import Selector
    from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice
    from edgefleet.cloud.services.api import FleetClient
    from edgefleet.cloud.services.values import EpochProgress

app = typer.Typer(
    name="fleet",
    help="edgefleet: train, quantize, sign and ship models to device fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models_cli.app, name="models")
app.add_typer(devices_cli.app, name="devices")
app.add_typer(rollouts_cli.app, name="rollouts")
app.add_typer(fl_cli.app, name="fl")
app.add_typer(db_cli.app, name="db")
app.add_typer(broker_cli.app, name="broker")
app.add_typer(keys_cli.app, name="keys")
app.add_typer(tokens_cli.app, name="tokens")
app.add_typer(audit_cli.app, name="audit")
app.add_typer(report_cli.app, name="report")
app.add_typer(agent_cli.app, name="agent")
app.command("sim")(sim_cli.sim)
app.command("drift")(drift_cli.drift)
app.command("alerts")(drift_cli.alerts)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"fleet (edgefleet) {__version__}\n")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the edgefleet version and exit.",
        ),
    ] = False,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar="FLEET_HOME",
            help="State folder (default ~/.edgefleet).",
        ),
    ] = None,
    db_url: Annotated[
        str | None,
        typer.Option(
            "--db-url",
            envvar="FLEET_DB_URL",
            help="Registry database: sqlite:///PATH or postgresql://… (default SQLite in FLEET_HOME).",
        ),
    ] = None,
    artifacts: Annotated[
        str | None,
        typer.Option(
            "--artifacts",
            envvar="FLEET_ARTIFACT_URI",
            help="Artifact store: file:///PATH or s3://BUCKET/PREFIX (default FLEET_HOME/artifacts).",
        ),
    ] = None,
    s3_endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--s3-endpoint-url",
            envvar="FLEET_S3_ENDPOINT_URL",
            help="S3-compatible endpoint (MinIO, Ceph…) for s3:// stores.",
        ),
    ] = None,
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator",
            envvar="FLEET_COORDINATOR",
            help="HOST:PORT of a running 'fleet serve'; commands go through it "
            "(default: in-process, or the 'fleet serve' of FLEET_HOME).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="FLEET_TOKEN",
            help="API token for --coordinator (default: FLEET_HOME/keys/token).",
        ),
    ] = None,
    ca: Annotated[
        str | None,
        typer.Option(
            "--ca",
            envvar="FLEET_CA",
            help="CA certificate (PEM) to verify --coordinator's TLS with (default: the one in "
            "FLEET_HOME/tls, else the system's).",
        ),
    ] = None,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            metavar="",
            show_default=False,
            help="More log output (-v info, -vv debug).",
        ),
    ] = 0,
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    quiet_third_party(verbose)
    ctx.obj = State(
        home=home,
        db_url=db_url,
        artifacts=artifacts,
        s3_endpoint_url=s3_endpoint_url,
        coordinator=coordinator,
        token=token,
        ca=ca,
    )


@app.command()
def init(
    ctx: typer.Context,
    db_url: Annotated[
        str | None,
        typer.Option(
            "--db-url",
            help="Registry database to record in config.toml (same as the global --db-url).",
        ),
    ] = None,
    artifacts: Annotated[
        str | None,
        typer.Option(
            "--artifacts",
            help="Artifact store to record in config.toml (same as the global --artifacts).",
        ),
    ] = None,
    s3_endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--s3-endpoint-url",
            help="S3-compatible endpoint to record in config.toml (same as the global option).",
        ),
    ] = None,
    root_passphrase: keys_cli.PassphraseOpt = None,
    encrypt_key: Annotated[
        bool,
        typer.Option(
            "--encrypt-key",
            help="Encrypt the new signing key with a passphrase (FLEET_SIGNING_PASSPHRASE, "
            "else asked for); `fleet serve` then needs the same passphrase.",
        ),
    ] = False,
) -> None:
    """Create FLEET_HOME: config, registry database, artifact store, root and signing keys,
    API token.

    Both stores are checked first; a failed first init leaves no FLEET_HOME behind.
    """
    from edgefleet.cloud.client import LocalClient

    state: State = ctx.find_root().obj
    if db_url:
        state.db_url, state._settings = db_url, None
    if artifacts:
        state.artifacts, state._settings = artifacts, None
    if s3_endpoint_url:
        state.s3_endpoint_url, state._settings = s3_endpoint_url, None
    settings = settings_of(ctx)
    if encrypt_key and settings.passphrase is None:
        from pydantic import SecretStr

        phrase = typer.prompt(
            "signing key passphrase", hide_input=True, confirmation_prompt=True, err=True
        )
        settings = settings.model_copy(update={"signing_passphrase": SecretStr(phrase)})
    elif not encrypt_key and settings.passphrase is not None:
        encrypt_key = True  # FLEET_SIGNING_PASSPHRASE set: use it
    client = LocalClient(settings)
    try:
        result = client.init(root_passphrase=root_passphrase.encode() if root_passphrase else None)
    finally:
        client.close()  # its database too: nothing of FLEET_HOME stays open after init
    out.print(f"FLEET_HOME  {result.home}")
    out.print(f"registry    {result.registry}")
    out.print(f"artifacts   {result.artifacts}")
    out.print(
        f"signing key {result.key_id} ({'created' if result.created_key else 'kept existing'})"
    )
    out.print(
        f"root key    {result.root_key_id} ({'created' if result.created_root else 'kept existing'})"
    )
    out.print(
        f"api token   {result.home / 'keys' / 'token'} "
        f"({'created' if result.created_token else 'kept existing'}; token 'admin')"
    )
    if encrypt_key and result.created_key:
        err.print("signing key encrypted: set FLEET_SIGNING_PASSPHRASE for 'fleet serve'")
    err.print(f"settings written to {result.config}")


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="Registry model name, e.g. digits.")],
    arch: Annotated[
        str, typer.Option("--arch", help="Architecture: mlp or cnn (models.arch).")
    ] = "mlp",
    data: Annotated[
        str, typer.Option("--data", help="'digits' or a path to .npz (X, y) / .csv.")
    ] = "digits",
    epochs: Annotated[int, typer.Option(min=1, max=10_000)] = 20,
    seed: Annotated[int, typer.Option()] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(min=1e-9)] = 3e-3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the new version as JSON.")] = False,
) -> None:
    """Train a model, export fp32 ONNX and register it as a new version."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    client = client_of(ctx)
    with Progress(
        TextColumn("[bold]train[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(f"{model} ({arch})", total=epochs, loss="-", acc="-")

        def on_epoch(stat: EpochProgress) -> None:
            bar.update(
                task,
                completed=stat.epoch,
                loss=f"{stat.loss:.4f}",
                acc=f"{stat.train_accuracy:.2%}",
            )

        mv = client.train(
            model,
            data,
            arch=arch,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            on_epoch=on_epoch,
        )
    if as_json:
        emit_json(version_json(mv))
    else:
        print_version(mv)


@app.command()
def quantize(
    ctx: typer.Context,
    ref: Annotated[
        str, typer.Argument(metavar="NAME:VERSION", help="Version to build variants of.")
    ],
    variants: Annotated[
        str,
        typer.Option(
            "--variants", help="Comma list: int8, int8-dynamic, fp16, tflite-fp32, tflite-int8."
        ),
    ] = "int8,fp16,tflite-fp32,tflite-int8",
    max_drop: Annotated[
        float,
        typer.Option(
            "--max-drop", help="Largest accuracy drop vs fp32, in points, for a deployable variant."
        ),
    ] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild variants that exist.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build quantized / converted variants, evaluate each in its runtime, gate and sign them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgefleet.cloud.variants import parse_variants

    names = parse_variants(variants)
    parsed = ModelRef.parse(ref)
    client = client_of(ctx)
    with Progress(
        TextColumn("[bold]quantize[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(str(parsed), total=len(names))

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, completed=done, description=f"{parsed} {what}")

        mv = client.quantize(parsed, names, max_drop=max_drop, force=force, progress=progress)
    if as_json:
        emit_json(version_json(mv))
    else:
        print_version(mv)


@app.command()
def serve(
    ctx: typer.Context,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            "--mqtt-url",
            envvar="FLEET_BROKER",
            help="Use this broker (mqtt://HOST:PORT or mqtts://…) instead of starting Mosquitto.",
        ),
    ] = None,
    mqtt_port: Annotated[
        int | None,
        typer.Option(
            "--mqtt-port",
            envvar="FLEET_MQTT_PORT",
            min=0,
            max=65535,
            help="Port of the managed broker on 127.0.0.1 (default 1883); 0 picks a free one. "
            "A port held by another program is an error naming it.",
        ),
    ] = None,
    grpc_listen: Annotated[
        str | None,
        typer.Option(
            "--grpc-listen",
            envvar="FLEET_GRPC_LISTEN",
            help="FleetService address (default 127.0.0.1:7443); port 0 picks a free one.",
        ),
    ] = None,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            "--metrics-listen",
            envvar="FLEET_METRICS_LISTEN",
            help="Prometheus /metrics address, or 'off' (default 127.0.0.1:9464); "
            "port 0 picks a free one.",
        ),
    ] = None,
    ui_listen: Annotated[
        str | None,
        typer.Option(
            "--ui-listen",
            envvar="FLEET_UI_LISTEN",
            help="Browser console address HOST:PORT (default off); port 0 picks a free one. "
            "Sign in with an API token (fleet tokens create); viewers get a read-only console.",
        ),
    ] = None,
    ui_tls: Annotated[
        bool | None,
        typer.Option(
            "--ui-tls/--no-ui-tls",
            envvar="FLEET_UI_TLS",
            help="Serve the console over HTTPS (default: on unless --ui-listen is loopback; "
            "the certificate is --ui-tls-cert, else --grpc-tls-cert, else one made in "
            "FLEET_HOME/tls).",
        ),
    ] = None,
    ui_tls_cert: Annotated[
        str | None,
        typer.Option(
            "--ui-tls-cert", envvar="FLEET_UI_TLS_CERT", help="Console certificate (PEM)."
        ),
    ] = None,
    ui_tls_key: Annotated[
        str | None,
        typer.Option("--ui-tls-key", envvar="FLEET_UI_TLS_KEY", help="Its private key (PEM)."),
    ] = None,
    advertise_broker: Annotated[
        str | None,
        typer.Option(
            "--advertise-broker",
            envvar="FLEET_ADVERTISE_BROKER",
            help="Broker URL put in enrolment bundles, when devices reach the broker by another "
            "name than the coordinator.",
        ),
    ] = None,
    mqtt_listen: Annotated[
        str | None,
        typer.Option(
            "--mqtt-listen",
            envvar="FLEET_MQTT_LISTEN",
            help="TLS listener(s) of the managed broker for devices on the network, "
            "HOST:PORT,HOST:PORT…, e.g. 0.0.0.0:8883; devices need their client certificate "
            "(default: loopback only).",
        ),
    ] = None,
    grpc_tls: Annotated[
        bool | None,
        typer.Option(
            "--grpc-tls/--no-grpc-tls",
            envvar="FLEET_GRPC_TLS",
            help="Serve FleetService over TLS (default: on unless --grpc-listen is loopback; "
            "a certificate is made in FLEET_HOME/tls if none is given).",
        ),
    ] = None,
    grpc_tls_cert: Annotated[
        str | None,
        typer.Option(
            "--grpc-tls-cert",
            envvar="FLEET_GRPC_TLS_CERT",
            help="FleetService certificate chain (PEM).",
        ),
    ] = None,
    grpc_tls_key: Annotated[
        str | None,
        typer.Option(
            "--grpc-tls-key",
            envvar="FLEET_GRPC_TLS_KEY",
            help="Its private key (PEM).",
        ),
    ] = None,
    graceful_timeout: Annotated[
        float,
        typer.Option("--graceful-timeout", min=0, help="Seconds calls in flight get at shutdown."),
    ] = 5.0,
    fl: Annotated[
        bool | None,
        typer.Option(
            "--fl/--no-fl",
            envvar="FLEET_FL",
            help="Run a Flower SuperLink for federated learning (needs edgefleet\\[fl]; "
            "default off).",
        ),
    ] = None,
    fl_listen: Annotated[
        str | None,
        typer.Option(
            "--fl-listen",
            envvar="FLEET_FL_LISTEN",
            help="SuperLink address devices' SuperNodes dial (default 127.0.0.1:9092); "
            "port 0 picks a free one.",
        ),
    ] = None,
    fl_advertise: Annotated[
        str | None,
        typer.Option(
            "--fl-advertise",
            envvar="FLEET_FL_ADVERTISE",
            help="SuperLink HOST:PORT put in enrolment bundles.",
        ),
    ] = None,
    ingest_workers: Annotated[
        int | None,
        typer.Option(
            "--ingest-workers",
            envvar="FLEET_INGEST_WORKERS",
            min=0,
            max=16,
            help="Telemetry ingest worker processes in the broker's shared subscription "
            "group, each with its own MQTT and database connection, restarted if they die "
            "(default 0: ingest inside the coordinator process; docs/scaling.md).",
        ),
    ] = None,
    replica: Annotated[
        bool | None,
        typer.Option(
            "--replica/--no-replica",
            envvar="FLEET_REPLICA",
            help="Run as one of several coordinator replicas on one PostgreSQL, one s3:// store "
            "and one external broker (--broker); one of them leads (docs/operators.md).",
        ),
    ] = None,
    replica_id: Annotated[
        str | None,
        typer.Option(
            "--replica-id",
            envvar="FLEET_REPLICA_ID",
            help="This replica's name in `fleet status` (default: host name and a random suffix).",
        ),
    ] = None,
    lease: Annotated[
        float | None,
        typer.Option(
            "--lease",
            envvar="FLEET_LEASE_S",
            min=0.5,
            max=3600,
            help="Leader lease in seconds (default 10): a leader that dies or loses the "
            "database is replaced within about twice this.",
        ),
    ] = None,
) -> None:
    """Run the coordinator: MQTT side, FleetService (gRPC) and, by default, a Mosquitto."""
    import asyncio
    import signal

    from edgefleet.cloud.config import ServeInfo
    from edgefleet.cloud.serve import serve as run_serve

    settings = settings_of(
        ctx,
        broker=broker,
        mqtt_port=mqtt_port,
        grpc_listen=grpc_listen,
        advertise_broker=advertise_broker,
        mqtt_listen=mqtt_listen,
        metrics_listen=metrics_listen,
        ui_listen=ui_listen,
        ui_tls=ui_tls,
        ui_tls_cert=ui_tls_cert,
        ui_tls_key=ui_tls_key,
        fl=fl,
        fl_listen=fl_listen,
        fl_advertise=fl_advertise,
        grpc_tls=grpc_tls,
        grpc_tls_cert=grpc_tls_cert,
        grpc_tls_key=grpc_tls_key,
        replica=replica,
        replica_id=replica_id,
        lease_s=lease,
        ingest_workers=ingest_workers,
    )
    if (
        settings.passphrase is None
        and sys.stdin.isatty()
        and is_encrypted(settings.signing_key_path)
    ):
        from pydantic import SecretStr

        phrase = typer.prompt("signing key passphrase", hide_input=True, err=True)
        settings = settings.model_copy(update={"signing_passphrase": SecretStr(phrase)})

    def ready(info: ServeInfo) -> None:
        tls = f"TLS, CA {info.grpc_ca or 'given'}" if info.grpc_tls else "plain"
        err.print(f"FleetService on {info.grpc} ({tls}); broker {info.broker_url}; pid {info.pid}")
        if info.metrics:
            err.print(f"metrics on {info.metrics}")
        if info.ui:
            err.print(f"console on {info.ui}" + (f" (CA {info.ui_ca})" if info.ui_ca else ""))
        if info.fl_superlink:
            err.print(f"Flower SuperLink (TLS, node auth) on {info.fl_superlink}")
        err.print(f"devices are told: {info.advertise_broker}; state in {settings.serve_path}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run_serve(settings, stop.wait, on_ready=ready, graceful_timeout=graceful_timeout)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(main())
    err.print("coordinator stopped")


PolicyOpt = Annotated[str | None, typer.Option(show_default=False)]


@app.command()
def deploy(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="Version to deploy.")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="all, group=G, tag=KEY=VALUE (tag=K=V,K2=V2: all of them; tag=K=V|K=W: any), "
            "device=ID[,ID…].",
        ),
    ],
    canary: Annotated[
        str | None,
        typer.Option("--canary", help="Share of the devices in the first stage, e.g. 10%."),
    ] = None,
    waves: Annotated[
        str | None,
        typer.Option("--waves", help="Cumulative shares after the canary (default 25%,50%,100%)."),
    ] = None,
    bake: Annotated[
        str | None,
        typer.Option("--bake", help="Shadow evaluation per stage before its gates, e.g. 60s."),
    ] = None,
    max_failure_rate: Annotated[
        str | None,
        typer.Option(
            "--max-failure-rate", help="Install/self-test failures per stage (default 2%)."
        ),
    ] = None,
    max_latency_regression: Annotated[
        str | None,
        typer.Option(
            "--max-latency-regression",
            help="Candidate p50 vs the previous model on the same devices, e.g. 20%.",
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option("--max-memory", metavar="MB", help="Candidate's memory on any device."),
    ] = None,
    min_agreement: Annotated[
        str | None,
        typer.Option("--min-agreement", help="Shadow agreement with the active model, e.g. 0.95."),
    ] = None,
    min_accuracy: Annotated[
        str | None,
        typer.Option("--min-accuracy", help="Shadow accuracy on labelled live inputs, e.g. 0.9."),
    ] = None,
    on_failure: Annotated[
        str | None,
        typer.Option(
            "--on-failure", help="When a gate fails: rollback or pause (default rollback)."
        ),
    ] = None,
    min_samples: Annotated[
        int | None,
        typer.Option(
            "--min-samples",
            min=1,
            help="Shadow samples a stage needs for quality gates (default 20).",
        ),
    ] = None,
    stage_timeout: Annotated[
        str | None,
        typer.Option(
            "--stage-timeout", help="Devices not settled by then count as failed (default 5m)."
        ),
    ] = None,
    sample_rate: Annotated[
        str | None,
        typer.Option(
            "--sample-rate", help="Share of live predictions shadow-evaluated (default 100%)."
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (stages, devices, gates); change nothing."),
    ] = False,
    sim: Annotated[
        int | None,
        typer.Option(
            "--sim",
            metavar="N",
            min=1,
            help="With --dry-run: run the policy on N simulated devices and report what happened.",
        ),
    ] = None,
    sim_profile: Annotated[
        str, typer.Option("--sim-profile", help="Simulated hardware: mixed, cpu, gpu, npu, litert.")
    ] = "mixed",
    watch: Annotated[
        bool, typer.Option("--watch/--no-watch", help="Follow a staged rollout until it ends.")
    ] = True,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=1,
            help="Plain deploy: seconds online devices get to settle before they count as failed.",
        ),
    ] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Deploy a version: all at once, or staged with gates when a policy flag is given.

    Staged: canary, then waves; each stage shadow-evaluates the candidate on the
    devices for --bake, then checks the gates; a failed gate rolls back (or pauses).
    Exit 0 done; 1 failed, rolled back or aborted; 3 paused.
    """
    from edgefleet.cloud.devices import Selector
    from edgefleet.cloud.rollouts import parse_policy

    parsed = ModelRef.parse(ref)
    selector = Selector.parse(to)
    policy = parse_policy(
        canary=canary,
        waves=waves,
        bake=bake,
        max_failure_rate=max_failure_rate,
        max_latency_regression=max_latency_regression,
        max_memory=max_memory,
        min_agreement=min_agreement,
        min_accuracy=min_accuracy,
        on_failure=on_failure,
        min_samples=min_samples,
        stage_timeout=stage_timeout,
        sample_rate=sample_rate,
    )
    if sim is not None:
        if not dry_run:
            raise InvalidArgument("--sim N tries a policy on simulated devices: add --dry-run")
        _dry_run_sim(ctx, parsed, selector, policy, sim, sim_profile, as_json)
        return
    if dry_run:
        _dry_run(ctx, parsed, selector, policy, as_json)
        return
    if policy is not None:
        _staged(ctx, parsed, selector, policy, watch=watch, as_json=as_json)
        return
    _all_at_once(ctx, parsed, selector, timeout=timeout, as_json=as_json)


def _dry_run(
    ctx: typer.Context, ref: ModelRef, selector: Selector, policy: Policy | None, as_json: bool
) -> None:
    from edgefleet.cloud.cli.rollout_view import print_rollout, rollout_json
    from edgefleet.cloud.config import ServeInfo

    settings = settings_of(ctx)
    live = settings.coordinator or ServeInfo.read(settings.serve_path)
    client = coordinator_of(ctx) if live else client_of(ctx)
    r, devices = client.create_rollout(ref, selector, policy, dry_run=True)
    if as_json:
        emit_json(rollout_json(r, devices))
    else:
        print_rollout(out, r, devices)
    err.print(
        f"dry run: nothing was sent ({sum(s.devices for s in r.stages)} devices planned); "
        "the real rollout puts the same devices in each stage while the selected devices "
        "stay the same"
    )


def _dry_run_sim(
    ctx: typer.Context,
    ref: ModelRef,
    selector: Selector,
    policy: Policy | None,
    n: int,
    profile: str,
    as_json: bool,
) -> None:
    from edgefleet.cloud.rollouts import Policy
    from edgefleet.simulator.dryrun import print_simulation, simulate

    result = simulate(
        settings_of(ctx),
        ref,
        selector,
        policy or Policy.all_at_once(),
        devices=n,
        profile=profile,
        progress=lambda line: err.print(line),
    )
    if as_json:
        emit_json(result.to_json())
    else:
        print_simulation(out, result)


def _staged(
    ctx: typer.Context,
    ref: ModelRef,
    selector: Selector,
    policy: Policy,
    *,
    watch: bool,
    as_json: bool,
) -> None:
    from edgefleet.cloud.cli.rollout_view import outcome_code, print_rollout, rollout_json

    client = coordinator_of(ctx)
    r, _devices = client.create_rollout(ref, selector, policy, dry_run=False)
    err.print(
        f"rollout {r.rollout_id}: {r.ref} to {sum(s.devices for s in r.stages)} devices "
        f"({policy.describe()})"
    )
    if watch:
        r = watch_until_outcome(client, r.rollout_id)
        r, _devices = client.get_rollout(r.rollout_id)
    if as_json:
        emit_json(rollout_json(r))
    else:
        print_rollout(out, r, ())
    if wire := _wire(ctx, client, r, _devices):  # model deltas (cloud/deltas)
        err.print(wire)
    err.print(f"rollout {r.rollout_id}: {r.state}" + (f" ({r.reason})" if r.reason else ""))
    if watch:
        raise typer.Exit(outcome_code(r))


def _all_at_once(
    ctx: typer.Context, parsed: ModelRef, selector: Selector, *, timeout: float, as_json: bool
) -> None:
    """A plain deploy: a one-stage rollout (`Policy.all_at_once`), stored and listed like
    any other; devices offline now are named at once and update when they reconnect."""
    from edgefleet.cloud.cli.rollout_view import print_plain_deploy, rollout_json
    from edgefleet.cloud.devices import Selector
    from edgefleet.cloud.rollouts import Policy
    from edgefleet.cloud.rollouts.controller import OFFLINE

    client = coordinator_of(ctx)
    policy = Policy.all_at_once().with_changes(stage_timeout_s=timeout)
    r, _devices = client.create_rollout(parsed, selector, policy, dry_run=False)
    total = sum(s.devices for s in r.stages)
    err.print(
        f"rollout {r.rollout_id}: {r.ref} to {total} devices at once "
        f"(fleet rollouts show {r.rollout_id})"
    )
    for dev, why in sorted(r.skipped.items()):
        err.print(f"skipped {dev}: {why}")
    _r, planned = client.get_rollout(r.rollout_id)
    ids = tuple(d.device_id for d in planned)
    offline = sorted(
        d.device_id for d in client.list_devices(Selector("device", devices=ids)) if not d.online
    )
    if offline:
        more = f" and {len(offline) - 10} more" if len(offline) > 10 else ""
        err.print(
            f"offline now: {', '.join(offline[:10])}{more}; their desired state is kept and "
            "they update when they reconnect"
        )
    r = watch_until_outcome(client, r.rollout_id)
    r, devices = client.get_rollout(r.rollout_id)
    if as_json:
        emit_json(rollout_json(r, devices))
    else:
        print_plain_deploy(out, r, devices)
    if wire := _wire(ctx, client, r, devices):  # model deltas (cloud/deltas)
        err.print(wire)
    active = sum(d.state == "active" for d in devices)
    failed = sum(d.phase == "failed" for d in devices)
    waiting = sum(d.reason == OFFLINE and d.state != "active" for d in devices)
    err.print(
        f"{r.ref} rollout {r.rollout_id}: {active} of {len(devices)} active, {failed} failed"
        + (f", {waiting} offline (they update when they reconnect)" if waiting else "")
    )
    if failed or r.state != "done":
        raise typer.Exit(1)


def _wire(
    ctx: typer.Context, client: FleetClient, r: Rollout, devices: Sequence[RolloutDevice]
) -> str:
    """Bytes a deploy sends (deltas per base -> target group) vs the full artifacts, from
    the registry database when this CLI reaches it ("" otherwise)."""
    from edgefleet.cloud.deltas import DeltaStore
    from edgefleet.cloud.deltas.offers import wire_summary
    from edgefleet.cloud.registry import ModelRef

    settings = settings_of(ctx)
    if settings.coordinator or not devices:
        return ""
    try:
        mv = client.get_version(ModelRef.parse(r.ref))
        sizes = {v.sha256: v.size for v in mv.variants}
        store = DeltaStore(settings.registry_url)
        try:
            summary = wire_summary(
                store,
                [
                    (d.previous.sha256 if d.previous else "", d.sha256, sizes.get(d.sha256, 0))
                    for d in devices
                ],
            )
        finally:
            store.close()
    except FleetError:
        return ""
    return f"{r.ref} rollout {r.rollout_id}: {summary.describe()}"


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Coordinator, broker and device counts (through the coordinator when one runs)."""
    from edgefleet.cloud.config import ServeInfo

    settings = settings_of(ctx)
    live = settings.coordinator or ServeInfo.read(settings.serve_path)
    st = (coordinator_of(ctx) if live else client_of(ctx)).status()
    if as_json:
        emit_json(status_json(st))
    else:
        print_status(st)


# modules of the `cloud` extra: a `fleet` installed without it says how to add them
_CLOUD_MODULES = frozenset(
    {"sqlalchemy", "sqlmodel", "psycopg", "boto3", "botocore", "torch", "onnx", "sklearn"}
)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 FleetError, 2 usage, 130 interrupted)."""
    import click

    if not sys.stdout.isatty():  # piped help is not squeezed into 80 columns
        os.environ.setdefault("TERMINAL_WIDTH", "120")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        rv = app(args=argv, prog_name="fleet", standalone_mode=False)
    except FleetError as e:
        err.print(f"[bold red]error[/bold red] ({e.kind}): {e}", markup=True, highlight=False)
        return 1
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except click.ClickException as e:
        e.show()
        return int(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return 130
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if missing not in _CLOUD_MODULES:
            raise

        err.print(
            f"[bold red]error[/bold red] (unavailable): this command needs the coordinator's "
            f"dependencies (no module {missing!r}): pip install 'edgefleet[cloud]'",
            markup=True,
            highlight=False,
        )
        return 1
    # standalone_mode=False returns an Exit's code instead of raising it
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
