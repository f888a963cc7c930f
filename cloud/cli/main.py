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
from typing import Annotated, Any

import typer

from cloud.cli import models as models_cli
from cloud.cli.context import State, client_of
from protos.errors import FleetError

app = typer.Typer(
    name="fleet",
    help="edgefleet: train, quantize, sign and ship models to device fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models_cli.app, name="models")


@app.callback()
def main_callback(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar="FLEET_HOME",
            help="State folder [env FLEET_HOME; default ~/.edgefleet].",
        ),
    ] = None,
    db_url: Annotated[
        str | None,
        typer.Option(
            "--db-url",
            envvar="FLEET_DB_URL",
            help="Registry database: sqlite:///PATH or postgresql://… [env FLEET_DB_URL].",
        ),
    ] = None,
    artifacts: Annotated[
        str | None,
        typer.Option(
            "--artifacts",
            envvar="FLEET_ARTIFACT_URI",
            help="Artifact store: file:///PATH or s3://BUCKET/PREFIX [env FLEET_ARTIFACT_URI].",
        ),
    ] = None,
    s3_endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--s3-endpoint-url",
            envvar="FLEET_S3_ENDPOINT_URL",
            help="S3-compatible endpoint [env FLEET_S3_ENDPOINT_URL].",
        ),
    ] = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")
    ] = 0,
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    ctx.obj = State(home=home, db_url=db_url, artifacts=artifacts, s3_endpoint_url=s3_endpoint_url)


@app.command()
def init(ctx: typer.Context) -> None:
    """Create FLEET_HOME: config, registry database, artifact store, Ed25519 signing key."""
    from cloud.cli.output import err, out

    result = client_of(ctx).init()
    out.print(f"FLEET_HOME  {result.home}")
    out.print(f"registry    {result.registry}")
    out.print(f"artifacts   {result.artifacts}")
    out.print(
        f"signing key {result.key_id} ({'created' if result.created_key else 'kept existing'})"
    )
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

    from cloud.cli.output import emit_json, err, print_version, version_json

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

        def on_epoch(stat: Any) -> None:
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

    from cloud.cli.output import emit_json, err, print_version, version_json
    from cloud.registry import ModelRef
    from cloud.variants import parse_variants

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


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 FleetError, 2 usage, 130 interrupted)."""
    import click

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        rv = app(args=argv, prog_name="fleet", standalone_mode=False)
    except FleetError as e:
        from cloud.cli.output import err

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
    # standalone_mode=False returns an Exit's code instead of raising it
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
