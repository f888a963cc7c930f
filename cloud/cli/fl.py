"""`fleet fl …`: federated runs with Flower (start, watch, ls, show).

`start` and `watch` go through the running coordinator (`fleet serve --fl`) and
print each round as it ends; `ls` and `show` read the coordinator's database
(through it when one runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cloud.cli.context import coordinator_of, services_of, settings_of
from edgefleet.cloud.cli.output import emit_json, err, iso_utc, out
from edgefleet.cloud.registry import ModelRef

if TYPE_CHECKING:
    from edgefleet.cloud.fl.federation import FlEnrollment
    from edgefleet.cloud.fl.remote import FederatedClient
    from edgefleet.cloud.fl.store import FlRun

app = typer.Typer(
    help="Federated learning: train on devices' own data with Flower, register the result.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _remote(ctx: typer.Context) -> FederatedClient:
    from edgefleet.cloud.fl.remote import FederatedClient

    return FederatedClient(coordinator_of(ctx))


class _LocalRuns:
    """`ls`/`show` without a running coordinator: the database directly."""

    def __init__(self, ctx: typer.Context) -> None:
        self.store = services_of(ctx).fl_store

    def get(self, run_id: str) -> FlRun:
        return self.store.get_run(run_id)

    def list(self, *, model: str | None = None, limit: int = 50) -> list[FlRun]:
        return self.store.list_runs(model=model, limit=limit)


def _runs(ctx: typer.Context) -> Any:
    from edgefleet.cloud.config import ServeInfo

    settings = settings_of(ctx)
    if settings.coordinator or ServeInfo.read(settings.serve_path):
        return _remote(ctx)
    return _LocalRuns(ctx)


def enroll_fl(ctx: typer.Context, device_id: str) -> FlEnrollment:
    """A node key for `device_id`: through the running coordinator (registered with its
    SuperLink at once), else recorded here and registered when `fleet serve --fl` starts."""
    from edgefleet.cloud.config import ServeInfo
    from edgefleet.cloud.fl.federation import advertised, enroll_node

    settings = settings_of(ctx)
    if settings.coordinator or ServeInfo.read(settings.serve_path):
        return _remote(ctx).enroll(device_id)
    return enroll_node(services_of(ctx).fl_store, settings, device_id, advertised(settings))


# -- output ---------------------------------------------------------------------------------


def run_json(r: FlRun) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "model": r.model,
        "parent": r.parent,
        "strategy": r.strategy,
        "rounds": r.rounds,
        "status": r.status,
        "reason": r.reason,
        "participants": list(r.participants),
        "skipped": dict(r.skipped),
        "history": [dict(h) for h in r.history],
        "flower_run_id": str(r.flower_run_id or ""),
        "result": r.result,
        "deploy": dict(r.deploy),
        "config": dict(r.config),
        "created_at": iso_utc(r.created_at),
        "finished_at": iso_utc(r.finished_at),
    }


def round_line(r: FlRun, h: Any) -> str:
    ev = h.get("evaluate") or {}
    tr = h.get("train") or {}
    acc = ev.get("eval-accuracy")
    loss = ev.get("eval-loss", tr.get("train-loss"))
    errors = h.get("errors") or {}
    parts = [
        f"round {h.get('round')}/{r.rounds}",
        f"{len(h.get('participants', []))} of {len(h.get('sampled', []))} answered",
        f"loss {loss:.4f}" if isinstance(loss, int | float) else "loss -",
        f"held-out accuracy {acc:.2%}" if isinstance(acc, int | float) else "accuracy -",
    ]
    if errors:
        parts.append("errors: " + "; ".join(f"{d}: {e}" for d, e in sorted(errors.items())))
    return "  ".join(parts)


def print_run(r: FlRun) -> None:
    out.print(f"run          {r.run_id}  (Flower run {r.flower_run_id or '-'})")
    out.print(f"status       {r.status}" + (f": {r.reason}" if r.reason else ""))
    out.print(f"from         {r.parent}  strategy {r.strategy}, {r.rounds} round(s)")
    out.print(f"participants {', '.join(r.participants) or '-'}")
    for d, why in sorted(r.skipped.items()):
        out.print(f"  skipped    {d}: {why}")
    for h in r.history:
        out.print(f"  {round_line(r, h)}")
    if r.result:
        out.print(f"result       {r.result}")
    if r.deploy:
        states = ", ".join(f"{d} {s}" for d, s in sorted(dict(r.deploy.get("states", {})).items()))
        out.print(
            f"canary       rollout {r.deploy.get('rollout_id', '')}: {states or 'no targets'}"
        )


def print_runs(runs: list[FlRun]) -> None:
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("RUN", "FROM", "STRATEGY", "ROUNDS", "STATUS", "RESULT", "PARTICIPANTS", "CREATED"):
        t.add_column(col)
    for r in runs:
        t.add_row(
            r.run_id,
            r.parent,
            r.strategy,
            f"{len(r.history)}/{r.rounds}",
            r.status,
            r.result or "-",
            str(len(r.participants)),
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(t)


def _follow(start: Any, as_json: bool) -> None:
    """Call `start(on_update)`; print each new round to stderr; the result to stdout."""
    seen: dict[str, Any] = {"rounds": 0, "status": ""}

    def on_update(r: FlRun) -> None:
        if not seen["status"]:
            err.print(
                f"federated run {r.run_id}: {r.parent} with {r.strategy}, {r.rounds} round(s), "
                f"participants {', '.join(r.participants) or '-'}"
            )
            for d, why in sorted(r.skipped.items()):
                err.print(f"  skipped {d}: {why}")
        for h in r.history[int(seen["rounds"]) :]:
            err.print(round_line(r, h))
        seen["rounds"] = len(r.history)
        if r.status != seen["status"]:
            seen["status"] = r.status
            if r.status in ("registering", "deploying"):
                err.print(f"{r.run_id}: {r.status}…")

    final = start(on_update)
    if as_json:
        emit_json(run_json(final))
    else:
        print_run(final)
    if final.status != "succeeded":
        err.print(f"[bold red]federated run {final.run_id} failed[/bold red]: {final.reason}")
        raise typer.Exit(1)


# -- commands -------------------------------------------------------------------------------


@app.command()
def start(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME:VERSION", help="Version to start from.")],
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=1000)] = 3,
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy",
            help="fedavg, fedprox, fedavgm, fedadam, fedmedian, fedtrimmedavg or krum.",
        ),
    ] = "fedavg",
    min_clients: Annotated[
        int,
        typer.Option("--min-clients", min=1, help="Fewest devices a round may proceed with."),
    ] = 2,
    fraction: Annotated[
        float, typer.Option("--fraction", help="Share of participants sampled per round.")
    ] = 1.0,
    local_epochs: Annotated[int, typer.Option("--local-epochs", min=1)] = 1,
    lr: Annotated[float, typer.Option("--lr", min=1e-9, help="Local learning rate.")] = 3e-3,
    dp_clip: Annotated[
        float,
        typer.Option("--dp-clip", min=0, help="Clip each update to this L2 norm (server-side DP)."),
    ] = 0.0,
    dp_noise: Annotated[
        float,
        typer.Option("--dp-noise", min=0, help="Gaussian noise multiplier (needs --dp-clip)."),
    ] = 0.0,
    to: Annotated[
        str,
        typer.Option("--to", help="Candidate devices: all, group=G, tag=KEY=VALUE, device=ID,…"),
    ] = "all",
    then_deploy: Annotated[
        str,
        typer.Option(
            "--then-deploy",
            help="Start a staged rollout of the result: canary=10% (optionally ,bake=30s); "
            "the run waits for the canary stage.",
        ),
    ] = "",
    min_samples: Annotated[
        int, typer.Option("--min-samples", min=1, help="Local samples a device needs.")
    ] = 20,
    idle_only: Annotated[
        bool, typer.Option("--idle-only", help="Skip devices busy with an update.")
    ] = False,
    round_timeout: Annotated[
        float, typer.Option("--round-timeout", min=1, help="Seconds a round waits for replies.")
    ] = 120.0,
    join_timeout: Annotated[
        float,
        typer.Option("--join-timeout", min=1, help="Seconds to wait for participants to connect."),
    ] = 60.0,
    evaluate: Annotated[
        str,
        typer.Option(
            "--evaluate",
            help="separate: an evaluate message per device per round; on-train: each "
            "train message first scores the model it received (half the device processes).",
        ),
    ] = "separate",
    variants: Annotated[
        str,
        typer.Option("--variants", help="Variants to build for the result ('' for fp32 only)."),
    ] = "int8,fp16,tflite-fp32,tflite-int8",
    deploy_timeout: Annotated[
        float, typer.Option("--deploy-timeout", min=1, help="Seconds the canary may take.")
    ] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Run federated rounds from NAME:VERSION; register the result as the next version."""
    from edgefleet.cloud.devices import Selector
    from edgefleet.cloud.fl.federation import RunRequest
    from edgefleet.cloud.variants import parse_variants

    req = RunRequest(
        ref=ModelRef.parse(ref),
        rounds=rounds,
        strategy=strategy.lower(),
        min_clients=min_clients,
        fraction=fraction,
        local_epochs=local_epochs,
        lr=lr,
        dp_clip=dp_clip,
        dp_noise=dp_noise,
        selector=Selector.parse(to),
        then_deploy=then_deploy,
        round_timeout=round_timeout,
        join_timeout=join_timeout,
        evaluate=evaluate,
        min_samples=min_samples,
        idle_only=idle_only,
        variants=tuple(parse_variants(variants)) if variants.strip() else (),
        deploy_timeout=deploy_timeout,
    )
    req.check()  # usage errors before dialling the coordinator
    client = _remote(ctx)
    _follow(lambda on_update: client.start(req, on_update), as_json)


@app.command()
def watch(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    as_json: JsonOpt = False,
) -> None:
    """Follow a run until it ends (exit 1 if it fails)."""
    client = _remote(ctx)
    _follow(lambda on_update: client.watch(run_id, on_update), as_json)


@app.command("ls")
def ls(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List federated runs, newest first."""
    runs = _runs(ctx).list(model=model, limit=limit)
    if as_json:
        emit_json([run_json(r) for r in runs])
    else:
        print_runs(runs)


@app.command()
def show(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    as_json: JsonOpt = False,
) -> None:
    """One run: participants and skips with reasons, each round, the result, the canary."""
    r = _runs(ctx).get(run_id)
    if as_json:
        emit_json(run_json(r))
    else:
        print_run(r)
