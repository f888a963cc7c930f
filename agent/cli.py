"""`fleet-agent`: the device side.

`info` prints what this device can run; `verify` checks an exported artifact
against its signed manifest and the coordinator's public key, offline.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.protos.errors import FleetError, InvalidArgument

app = typer.Typer(
    name="fleet-agent",
    help="edgefleet device agent.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from edgefleet import __version__

        sys.stdout.write(f"fleet-agent (edgefleet) {__version__}\n")
        raise typer.Exit()


@app.callback()
def _callback(
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
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), stream=sys.stderr)


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Runtimes, execution providers and memory this device really has."""
    from dataclasses import asdict

    from edgefleet.agent.capabilities import detect

    caps = asdict(detect())
    if as_json:
        sys.stdout.write(json.dumps(caps, indent=2) + "\n")
        return
    for k, v in caps.items():
        sys.stdout.write(f"{k:12} {', '.join(v) if isinstance(v, tuple) else v}\n")


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="Model file (.onnx / .tflite).")],
    manifest: Annotated[
        Path, typer.Option("--manifest", help="Signed manifest written by 'fleet models export'.")
    ],
    public_key: Annotated[
        Path, typer.Option("--public-key", help="Coordinator's signing.pub (PEM).")
    ],
    load: Annotated[
        bool, typer.Option("--load/--no-load", help="Also load it and run the golden self-test.")
    ] = True,
) -> None:
    """Check signature, size and sha256; then load the model and self-test it."""
    from edgefleet.agent.selftest import self_test
    from edgefleet.protos.manifest import (
        SignedManifest,
        check_artifact,
        load_public_key,
        verify_manifest,
    )

    key = load_public_key(_read(public_key, "public key"))
    m = verify_manifest(SignedManifest.from_bytes(_read(manifest, "manifest")), key)
    data = _read(artifact, "artifact")
    check_artifact(m, data)
    sys.stdout.write(f"{m.ref}: signature ok, sha256 ok ({m.size} bytes, {m.runtime})\n")
    if load:
        diff = self_test(m, data)
        sys.stdout.write(
            f"{m.ref}: self-test ok (max |Δ| {diff:.2e} ≤ {m.golden.atol if m.golden else 0:.2e})\n"
        )


DEFAULT_CONFIG = Path("/etc/edgefleet/agent.json")


@app.command("install")
def install_model(
    artifact: Annotated[Path, typer.Argument(help="Model file from 'fleet models export'.")],
    manifest: Annotated[
        Path, typer.Option("--manifest", help="Its signed manifest (same folder, .manifest).")
    ],
    config: Annotated[
        Path, typer.Option("--config", help="Agent config written by 'fleet-agent enroll'.")
    ] = DEFAULT_CONFIG,
) -> None:
    """Install and activate a model without a broker (the agent must be stopped).

    Same checks as an update: signature against the keys this device trusts, size and
    sha256, self-test; the model served before stays as last-known-good. Reported to
    the coordinator (reason offline_install) when the agent next connects.
    """
    from edgefleet.agent.capabilities import detect
    from edgefleet.agent.config import load_config
    from edgefleet.agent.offline import install

    settings = load_config(config)
    caps = detect()
    done = install(
        settings,
        artifact,
        manifest,
        runtimes=caps.runtimes,
        providers=caps.providers or ("CPUExecutionProvider",),
    )
    sys.stdout.write(
        f"{done.ref}: signature ok, sha256 ok, self-test ok (max |Δ| {done.self_test_diff:.2e}); "
        f"active in {settings.state_dir}"
        f"{f', last-known-good {done.previous[:12]}…' if done.previous else ''}\n"
    )


@app.command()
def wheelhouse(
    platform: Annotated[
        str, typer.Option("--platform", help="Wheel platform tag, e.g. manylinux2014_aarch64.")
    ],
    python: Annotated[str, typer.Option("--python", help="Device Python, MAJOR.MINOR.")] = "3.11",
    out: Annotated[Path, typer.Option("--out", help="Folder to fill with wheels.")] = Path(
        "wheelhouse"
    ),
    agent_wheel: Annotated[
        Path | None,
        typer.Option("--agent-wheel", help="edgefleet-agent wheel to include (from make dist)."),
    ] = None,
    extra: Annotated[
        list[str] | None,
        typer.Option("--extra", help="Agent extras (serve, litert, gpu, fl, delta)."),
    ] = None,
    constraints: Annotated[
        Path | None, typer.Option("--constraint", "-c", help="pip constraints file.")
    ] = None,
    index_url: Annotated[
        str, typer.Option("--index-url", help="Registry mirror (default: pip's).")
    ] = "",
    dry_run: Annotated[
        bool, typer.Option("--print", help="Print the pip command instead of running it.")
    ] = False,
) -> None:
    """Download the agent's wheels for a device platform (pip download)."""
    import shlex
    import subprocess

    from edgefleet.agent.wheelhouse import WheelhouseSpec, pip_command

    spec = WheelhouseSpec(
        platform=platform,
        python=python,
        out=out,
        agent_wheel=agent_wheel,
        extras=tuple(extra or ()),
        constraints=constraints,
        index_url=index_url,
    )
    if agent_wheel is not None and not agent_wheel.is_file():
        from edgefleet.protos.errors import NotFound

        raise NotFound(f"agent wheel {str(agent_wheel)!r} not found")
    cmd = pip_command(spec)
    if dry_run:
        sys.stdout.write(shlex.join(cmd) + "\n")
        return
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        from edgefleet.protos.errors import Unavailable

        raise Unavailable(f"pip download for {platform} / Python {python} failed (exit {rc})")
    sys.stdout.write(
        f"{out}: wheels for {platform}, Python {python}; on the device: pip install "
        f"--no-index --find-links {out} edgefleet-agent\n"
    )


@app.command()
def enroll(
    bundle: Annotated[
        Path, typer.Argument(help="Enrolment bundle from 'fleet devices enroll ID --out FILE'.")
    ],
    config: Annotated[
        Path, typer.Option("--config", help="Where to write the agent's config.")
    ] = DEFAULT_CONFIG,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Models, downloads, spool.")
    ] = Path("/var/lib/edgefleet"),
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            help="Local InferenceService address ('' to disable; default 127.0.0.1:50051 "
            "when gRPC is installed, the [serve] extra, else none).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
) -> None:
    """Install an enrolment bundle: writes the agent config (mode 0600)."""
    from edgefleet.agent.config import (
        SERVE_INSTALL,
        config_from_bundle,
        default_listen,
        require_server,
        write_config,
    )

    if listen is None:
        listen = default_listen()
        if not listen:
            sys.stderr.write(
                "no local InferenceService (grpcio is not installed; for one: "
                f"{SERVE_INSTALL}, then enroll again with --force)\n"
            )
    require_server(listen, "fleet-agent enroll --listen")
    settings = config_from_bundle(_read(bundle, "bundle"), state_dir=state_dir, listen=listen)
    write_config(config, settings, force=force)
    sys.stdout.write(
        f"enrolled {settings.device_id}: config {config}, broker {settings.broker_url}\n"
    )


@app.command()
def run(
    config: Annotated[
        Path, typer.Option("--config", help="Agent config written by 'fleet-agent enroll'.")
    ] = DEFAULT_CONFIG,
) -> None:
    """Run the agent until SIGINT/SIGTERM: MQTT, updates, local inference, telemetry."""
    import asyncio
    import signal

    from edgefleet.agent.agent import Agent
    from edgefleet.agent.config import load_config
    from edgefleet.agent.selfupdate import exec_current

    settings = load_config(config)
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    # the service starts the base install: run the agent release it switched to
    exec_current(settings.state_dir, ["run", "--config", str(config.absolute())])

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Agent(settings, config_path=config.absolute()).run(stop.wait)

    asyncio.run(main())


@app.command()
def selfcheck(
    config: Annotated[
        Path, typer.Option("--config", help="Agent config written by 'fleet-agent enroll'.")
    ] = DEFAULT_CONFIG,
    expect_version: Annotated[
        str, typer.Option("--expect-version", help="Fail unless this agent is this version.")
    ] = "",
) -> None:
    """Check this agent installation against the device's state, changing nothing: its
    version, and the active model verified, loaded and self-tested. Prints one JSON line.
    An agent release runs this from its new venv before the agent switches to it."""
    import edgefleet
    from edgefleet.agent.capabilities import detect
    from edgefleet.agent.config import load_config
    from edgefleet.agent.inference import load
    from edgefleet.agent.keys import load_trust
    from edgefleet.agent.slots import ModelSlots
    from edgefleet.protos.keys import verify_manifest_trusted
    from edgefleet.protos.manifest import SignedManifest, check_artifact

    if expect_version and edgefleet.__version__ != expect_version:
        raise InvalidArgument(
            f"agent at {sys.prefix} is version {edgefleet.__version__}; expected {expect_version}"
        )
    settings = load_config(config)
    trust = load_trust(
        state_dir=settings.state_dir,
        public_key_pem=settings.public_key_pem,
        root_public_key_pem=settings.root_public_key_pem,
        key_list_b64=settings.key_list,
    )
    inst = ModelSlots(settings.state_dir).active()
    report: dict[str, object] = {"version": edgefleet.__version__, "prefix": sys.prefix}
    if inst is not None:
        manifest = verify_manifest_trusted(SignedManifest.from_bytes(inst.manifest_bytes), trust)
        data = inst.path.read_bytes()
        check_artifact(manifest, data)
        caps = detect()
        model = load(manifest, data, providers=caps.providers or ("CPUExecutionProvider",))
        report.update(model=manifest.ref, provider=model.provider, self_test="ok")
    sys.stdout.write(json.dumps(report) + "\n")


service_app = typer.Typer(help="Run the agent as a systemd service.", no_args_is_help=True)
app.add_typer(service_app, name="service")


@service_app.command("install")
def service_install(
    config: Annotated[
        Path, typer.Option("--config", help="Agent config the service runs with.")
    ] = DEFAULT_CONFIG,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="The only folder the service may write.")
    ] = Path("/var/lib/edgefleet"),
    user: Annotated[
        str, typer.Option("--user", help="System account the agent runs as.")
    ] = "edgefleet",
    unit_dir: Annotated[Path, typer.Option("--unit-dir", help="Where systemd units live.")] = Path(
        "/etc/systemd/system"
    ),
    enable: Annotated[
        bool, typer.Option("--enable", help="Also daemon-reload and enable --now.")
    ] = False,
    stdout: Annotated[
        bool, typer.Option("--print", help="Print the unit instead of writing it.")
    ] = False,
) -> None:
    """Write edgefleet-agent.service for this installation's fleet-agent."""
    from edgefleet.agent.service import ServiceSpec, install, render_unit, this_executable

    spec = ServiceSpec(
        executable=this_executable().absolute(),
        config=config.absolute(),
        state_dir=state_dir.absolute(),
        user=user,
    )
    if stdout:
        sys.stdout.write(render_unit(spec))
        return
    path = install(spec, unit_dir=unit_dir, enable=enable)
    sys.stdout.write(f"wrote {path}\n")
    if not enable:
        sys.stderr.write(
            f"next: useradd --system --home {spec.state_dir} {user}; "
            f"chown {user}: {spec.config}; systemctl daemon-reload; "
            "systemctl enable --now edgefleet-agent\n"
        )


def _read(path: Path, what: str) -> bytes:
    from edgefleet.protos.errors import NotFound

    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {str(path)!r} not found") from None


def main() -> None:
    try:
        app(standalone_mode=False)
    except FleetError as e:
        sys.stderr.write(f"error ({e.kind}): {e}\n")
        sys.exit(1)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
