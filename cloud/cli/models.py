"""`fleet models …`: list, show, import, promote, verify, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.cloud.cli.context import client_of, settings_of
from edgefleet.cloud.cli.output import (
    emit_json,
    err,
    out,
    print_models,
    print_version,
    print_versions,
    version_json,
)
from edgefleet.cloud.deltas import KEEP_RATIO, DeltaStore
from edgefleet.cloud.registry import ModelRef, ModelVersion
from edgefleet.cloud.registry.entities import check_model_name, check_stage
from edgefleet.cloud.services.api import FleetClient

app = typer.Typer(
    help="The model registry: versions, variants, stages, signatures.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command("ls")
def ls(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="A model name lists its versions.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List models, or the versions of one model."""
    client = client_of(ctx)
    if name is None:
        models = client.list_models()
        if as_json:
            emit_json(models)
        else:
            print_models(models)
        return
    versions = client.list_versions(check_model_name(name))
    if as_json:
        emit_json([version_json(v) for v in versions])
    else:
        print_versions(versions)


@app.command()
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME[:VERSION|@STAGE]")],
    as_json: JsonOpt = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            dir_okay=False,
            help="Also write a self-contained HTML report (variants chart, lineage) to FILE.",
        ),
    ] = None,
) -> None:
    """Show a version: lineage, and each variant's size, accuracy and latency."""
    client = client_of(ctx)
    mv = client.get_version(ModelRef.parse(ref))
    deltas = _deltas(ctx, client, mv)
    if html is not None:
        from edgefleet.cloud.cli.report import write_report
        from edgefleet.cloud.console.report import version_html

        write_report(html, version_html(mv), mv.ref)
    if as_json:
        emit_json({**version_json(mv), "deltas": deltas})
    else:
        print_version(mv)
        _print_deltas(deltas)


def _deltas(ctx: typer.Context, client: FleetClient, mv: ModelVersion) -> list[dict[str, Any]]:
    """The deltas built to this version's variants (cloud/deltas), from the registry
    database; a remote coordinator's are not listed (the FleetService has no call)."""
    settings = settings_of(ctx)
    if settings.coordinator:
        return []
    names = {v.sha256: f"{mv.model}:{mv.version}/{v.name}" for v in mv.variants}
    for other in client.list_versions(mv.model):
        names.update({v.sha256: f"{mv.model}:{other.version}/{v.name}" for v in other.variants})
    store = DeltaStore(settings.registry_url)
    try:
        recs = store.for_targets([v.sha256 for v in mv.variants])
    finally:
        store.close()
    return [
        {
            "target": names.get(r.target_sha256, r.target_sha256),
            "base": names.get(r.base_sha256, r.base_sha256),
            "format": r.format,
            "size": r.size,
            "full_size": r.target_size,
            "ratio": round(r.ratio, 4),
            "sha256": r.sha256,
        }
        for r in recs
    ]


def _print_deltas(deltas: list[dict[str, Any]]) -> None:
    if not deltas:
        return
    out.print("  deltas (sent instead of the full artifact to devices holding the base):")
    for d in deltas:
        if d["format"] == "none":
            out.print(
                f"    {d['base']} -> {d['target']}: none under {KEEP_RATIO:.0%} (full {d['full_size']} B)"
            )
            continue
        out.print(
            f"    {d['base']} -> {d['target']}: {d['format']} {d['size']} B "
            f"of {d['full_size']} B ({100 * d['ratio']:.1f}%)"
        )


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="An .onnx or .tflite model trained elsewhere.")],
    name: Annotated[str, typer.Option("--name", help="Registry model name.")],
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help=".npz with X and y to measure accuracy on.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a model trained elsewhere (ONNX or TFLite) as a new version."""
    mv = client_of(ctx).import_model(file, name, eval_data=eval_data)
    if as_json:
        emit_json(version_json(mv))
    else:
        print_version(mv)


@app.command()
def promote(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME:VERSION")],
    stage: Annotated[
        str, typer.Option("--stage", help="none, staging, production or archived.")
    ] = "production",
    keep_existing: Annotated[
        bool, typer.Option("--keep-existing", help="Do not archive versions already in that stage.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move a version to a stage; others in that stage are archived."""
    check_stage(stage)
    mv, archived = client_of(ctx).promote(
        ModelRef.parse(ref), stage, archive_existing=not keep_existing
    )
    if as_json:
        emit_json(
            {"model": mv.model, "version": mv.version, "stage": mv.stage, "archived": archived}
        )
        return
    out.print(f"{mv.ref} -> {mv.stage}")
    for v in archived:
        err.print(f"{mv.model}:{v} -> archived")


@app.command()
def verify(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME[:VERSION]")],
    as_json: JsonOpt = False,
) -> None:
    """Check every variant's bytes against its signed manifest. Exit 1 if any fails."""
    from rich.table import Table

    mv, results = client_of(ctx).verify(ModelRef.parse(ref))
    bad = [r for r in results if not r.ok]
    if as_json:
        emit_json({"model": mv.model, "version": mv.version, "ok": not bad, "results": results})
    else:
        t = Table(box=None, pad_edge=False)
        for col in ("ARTIFACT", "RESULT", "DETAIL"):
            t.add_column(col)
        for r in results:
            t.add_row(r.variant, "ok" if r.ok else "FAILED", r.detail)
        out.print(t)
    if bad:
        err.print(f"{mv.ref}: {len(bad)} of {len(results)} artifacts failed verification")
        raise typer.Exit(1)


@app.command()
def export(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME[:VERSION]")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into.")] = Path("."),
    variant: Annotated[
        list[str] | None, typer.Option("--variant", help="Only these variants (repeatable).")
    ] = None,
) -> None:
    """Write variants with their signed manifests (and weights.npz) to a folder."""
    for p in client_of(ctx).export(ModelRef.parse(ref), out_dir, variants=variant or []):
        out.print(str(p))
