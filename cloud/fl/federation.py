"""Federation: one coordinator's SuperLink and the federated runs it drives.

A run: choose participants → write the parent's checkpoint → `flwr run` → follow
the ServerApp's journal (rounds stream to whoever watches) → check and register
weights.npz as version N+1 with lineage → build variants (gates) → optional
canary. Each step's failure ends the run `failed` with its reason; the registry
only changes once the weights passed every check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.cloud.config import CloudSettings
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.fl.canary import CanaryPlan, start_canary
from edgefleet.cloud.fl.gateway import FleetApiGateway
from edgefleet.cloud.fl.selection import select_participants
from edgefleet.cloud.fl.store import FlRun, FlStore
from edgefleet.cloud.fl.superlink import SuperLink, SuperLinkOptions
from edgefleet.cloud.fl.tls import ensure_tls, new_node_key
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.variants import DEFAULT_VARIANTS, KINDS
from edgefleet.models.fl import APP_DIR, EVENTS_FILE, STRATEGIES, WEIGHTS_FILE
from edgefleet.models.fl.journal import read_events
from edgefleet.protos.backoff import Backoff
from edgefleet.protos.errors import FleetError, InvalidArgument, NotFound, Unavailable

if TYPE_CHECKING:
    from edgefleet.cloud.pipeline import Pipeline
    from edgefleet.cloud.rollouts.controller import RolloutController

logger = logging.getLogger(__name__)

POLL = 0.5
STATUS_EVERY = 5.0


@dataclass(frozen=True)
class RunRequest:
    ref: ModelRef
    rounds: int = 3
    strategy: str = "fedavg"
    min_clients: int = 2
    fraction: float = 1.0
    local_epochs: int = 1
    lr: float = 3e-3
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    selector: Selector = field(default_factory=lambda: Selector("all"))
    then_deploy: str = ""
    round_timeout: float = 120.0
    join_timeout: float = 60.0
    evaluate: str = "separate"
    min_samples: int = 20
    idle_only: bool = False
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    deploy_timeout: float = 300.0

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidArgument(
                f"--strategy {self.strategy!r} unknown; accepted: {', '.join(STRATEGIES)}"
            )
        if not 1 <= self.rounds <= 1000:
            raise InvalidArgument(f"--rounds {self.rounds}: expected 1 to 1000")
        if self.min_clients < 1:
            raise InvalidArgument(f"--min-clients {self.min_clients}: expected 1 or more")
        if not 0.0 < self.fraction <= 1.0:
            raise InvalidArgument(f"--fraction {self.fraction}: expected more than 0, at most 1")
        if self.local_epochs < 1:
            raise InvalidArgument(f"--local-epochs {self.local_epochs}: expected 1 or more")
        if self.dp_clip < 0 or self.dp_noise < 0:
            raise InvalidArgument(
                f"--dp-clip {self.dp_clip} / --dp-noise {self.dp_noise}: must be 0 or more"
            )
        if self.dp_noise > 0 and self.dp_clip == 0:
            raise InvalidArgument(
                f"--dp-noise {self.dp_noise} needs --dp-clip: noise is scaled to a clipping norm"
            )
        bad = [v for v in self.variants if v not in KINDS or v == "fp32"]
        if bad:
            raise InvalidArgument(f"--variants: unknown {', '.join(bad)}")
        if self.evaluate not in ("separate", "on-train"):
            raise InvalidArgument(f"--evaluate {self.evaluate!r}: expected separate or on-train")
        if self.round_timeout <= 0 or self.join_timeout <= 0:
            raise InvalidArgument("--round-timeout and --join-timeout must be positive")
        if self.then_deploy:
            CanaryPlan.parse(self.then_deploy)

    @property
    def dp(self) -> dict[str, float] | None:
        return {"clip": self.dp_clip, "noise": self.dp_noise} if self.dp_clip > 0 else None


@dataclass(frozen=True)
class FlEnrollment:
    """The federated part of a device's enrolment bundle (`bundle["fl"]`)."""

    device_id: str
    superlink: str  # HOST:PORT
    ca_certificate: str  # PEM
    private_key: str  # OpenSSH PEM: the node's authentication key
    node_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def advertised(settings: CloudSettings, listening: str = "") -> str:
    """The SuperLink address devices dial: --fl-advertise, else where it listens."""
    if settings.fl_advertise:
        return settings.fl_advertise
    addr = listening or settings.fl_listen
    host, _, port = addr.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "", "::", "[::]") else addr


def enroll_node(
    store: FlStore, settings: CloudSettings, device_id: str, superlink: str
) -> FlEnrollment:
    """Make and record a node key for an enrolled device (not yet registered with Flower)."""
    tls = ensure_tls(settings.fl_dir / "tls", hosts=[superlink.rpartition(":")[0]])
    key = new_node_key()
    store.add_node(device_id, key.public_openssh)
    return FlEnrollment(device_id, superlink, tls.ca_cert.read_text(), key.private_openssh)


class Federation:
    def __init__(
        self,
        settings: CloudSettings,
        *,
        pipeline: Pipeline,
        devices: DeviceStore,
        store: FlStore,
        rollouts: RolloutController | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.devices = devices
        self.store = store
        self.rollouts = rollouts
        host, _, port = settings.fl_listen.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(
                f"--fl-listen {settings.fl_listen!r} is not HOST:PORT; e.g. 0.0.0.0:9092"
            )
        self._host, self._port = host.strip("[]"), int(port)
        self.superlink: SuperLink | None = None
        self.gateway: FleetApiGateway | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._stop = asyncio.Event()

    @property
    def address(self) -> str:
        """What devices dial (advertised), once the SuperLink listens."""
        listening = self.gateway.address if self.gateway else ""
        return advertised(self.settings, listening)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        adv_host = advertised(self.settings, f"{self._host}:{self._port or 1}").rpartition(":")[0]
        tls = await asyncio.to_thread(
            ensure_tls, self.settings.fl_dir / "tls", hosts=[self._host, adv_host]
        )
        # the SuperLink (all of Flower's APIs) on loopback only; devices reach the
        # Fleet API alone, through the gateway on --fl-listen (cloud.fl.gateway)
        self.superlink = SuperLink(
            SuperLinkOptions(state_dir=self.settings.fl_dir, host="127.0.0.1", port=0, tls=tls)
        )
        await asyncio.to_thread(self.superlink.start)
        self.gateway = FleetApiGateway(
            host=self._host, port=self._port, upstream=self.superlink.address, tls=tls
        )
        await self.gateway.start()
        failed = await asyncio.to_thread(
            self.store.fail_unfinished, "the coordinator restarted while this run was going"
        )
        if failed:
            logger.warning("federated runs %s were cut short by a restart", ", ".join(failed))
        await self.sync_nodes()
        self._spawn(self._supervise(), "superlink-supervisor")

    async def stop(self) -> None:
        self._stop.set()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.gateway is not None:
            await self.gateway.stop()
        if self.superlink is not None:
            await asyncio.to_thread(self.superlink.stop)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _supervise(self) -> None:
        attempt = 0
        backoff = Backoff(0.5, 30.0)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._stop.wait()
            sl = self.superlink
            if self._stop.is_set() or sl is None or sl.running:
                attempt = 0
                continue
            attempt += 1
            delay = backoff.delay(attempt)
            logger.warning(
                "flower-superlink exited; restarting, retrying in %.1fs (attempt %d)",
                delay,
                attempt,
            )
            await asyncio.sleep(delay)
            try:
                await asyncio.to_thread(sl.start)
                await self.sync_nodes()
            except FleetError as e:
                logger.warning("flower-superlink restart failed: %s", e)

    async def sync_nodes(self) -> None:
        """Register every enrolled node key the SuperLink does not know yet."""
        sl = self._require()
        known = {str(n.get("node-id")) for n in await asyncio.to_thread(sl.nodes)}
        for node in await asyncio.to_thread(self.store.nodes):
            if node.node_id is not None and str(node.node_id) in known:
                continue
            try:
                node_id = await asyncio.to_thread(sl.register_node, node.public_key, node.device_id)
            except FleetError as e:
                logger.warning("registering %s's node key failed: %s", node.device_id, e)
                continue
            await asyncio.to_thread(self.store.set_node_id, node.device_id, node_id)
            logger.info("node key of %s registered as Flower node %d", node.device_id, node_id)

    def _require(self) -> SuperLink:
        if self.superlink is None or not self.superlink.running:
            raise Unavailable("the SuperLink is not running (it is being restarted); retry soon")
        return self.superlink

    # -- enrolment ----------------------------------------------------------------------

    async def enroll(self, device_id: str) -> FlEnrollment:
        await asyncio.to_thread(self.devices.get, device_id)  # NotFound unless enrolled
        sl = self._require()
        e = await asyncio.to_thread(enroll_node, self.store, self.settings, device_id, self.address)
        pub = (await asyncio.to_thread(self.store.nodes, [device_id]))[0].public_key
        node_id = await asyncio.to_thread(sl.register_node, pub, device_id)
        await asyncio.to_thread(self.store.set_node_id, device_id, node_id)
        return FlEnrollment(e.device_id, e.superlink, e.ca_certificate, e.private_key, node_id)

    # -- runs ---------------------------------------------------------------------------

    async def start_run(self, req: RunRequest) -> FlRun:
        """Check, choose participants, record the run and drive it in the background."""
        req.check()
        self._require()
        if req.then_deploy and self.rollouts is None:
            raise Unavailable("--then-deploy needs the coordinator's rollout controller")
        parent = await asyncio.to_thread(self.pipeline.registry.get_version, req.ref)
        if not parent.checkpoint_sha256:
            raise InvalidArgument(
                f"{parent.ref} has no trainable checkpoint (imported); federated runs start "
                "from a version made by 'fleet train'"
            )
        devices = await asyncio.to_thread(self.devices.find, req.selector)
        if not devices:
            raise NotFound(f"selector {req.selector} matches no enrolled device")
        nodes = {n.device_id: n for n in await asyncio.to_thread(self.store.nodes)}
        sel = select_participants(
            devices, nodes, min_samples=req.min_samples, idle_only=req.idle_only, arch=parent.arch
        )
        if len(sel.chosen) < req.min_clients:
            why = "; ".join(f"{d}: {r}" for d, r in sorted(sel.skipped.items())) or "none skipped"
            raise Unavailable(
                f"{len(sel.chosen)} eligible device(s) for {req.selector}; --min-clients is "
                f"{req.min_clients} ({why})"
            )
        run = FlRun(
            run_id=f"fl-{secrets.token_hex(4)}",
            model=parent.model,
            parent_version=parent.version,
            strategy=req.strategy,
            rounds=req.rounds,
            config=_config(req),
            status="running",
            participants=tuple(sorted(sel.chosen)),
            skipped=sel.skipped,
        )
        run = await asyncio.to_thread(self.store.create_run, run)
        self._spawn(self._drive(run, req, sel.chosen), f"fl-run-{run.run_id}")
        return run

    async def _update(self, run_id: str, **values: Any) -> FlRun:
        run = await asyncio.to_thread(self.store.update_run, run_id, **values)
        async with self._changed:
            self._changed.notify_all()
        return run

    async def _drive(self, run: FlRun, req: RunRequest, chosen: dict[str, int]) -> None:
        flower_id: int | None = None
        finished = False
        try:
            run_dir = self.settings.fl_dir / "runs" / run.run_id
            out = run_dir / "out"
            out.mkdir(parents=True, exist_ok=True)
            parent = await asyncio.to_thread(self.pipeline.registry.get_version, req.ref)
            assert parent.checkpoint_sha256
            ckpt = run_dir / "parent.npz"
            ckpt.write_bytes(
                await asyncio.to_thread(self.pipeline.store.get, parent.checkpoint_sha256)
            )
            rc = {
                "checkpoint": str(ckpt),
                "output-dir": str(out),
                "strategy": req.strategy,
                "num-rounds": req.rounds,
                "fraction": req.fraction,
                "min-clients": req.min_clients,
                "participants": ",".join(f"{d}={n}" for d, n in sorted(chosen.items())),
                "local-epochs": req.local_epochs,
                "lr": req.lr,
                "dp-clip": req.dp_clip,
                "dp-noise": req.dp_noise,
                "round-timeout": req.round_timeout,
                "join-timeout": req.join_timeout,
                "evaluate": req.evaluate,
            }
            sl = self._require()
            flower_id = await asyncio.to_thread(sl.submit, APP_DIR, rc)
            await self._update(run.run_id, flower_run_id=str(flower_id))
            done = await self._follow(run, req, flower_id, out)
            finished = True
            weights = await asyncio.to_thread((out / WEIGHTS_FILE).read_bytes)
            current = await self._update(run.run_id, status="registering")
            mv = await asyncio.to_thread(
                self.pipeline.register_federated,
                ModelRef(parent.model, parent.version),
                weights,
                federated=_lineage(current, req, flower_id, done),
                training_config={
                    "local_epochs": req.local_epochs,
                    "lr": req.lr,
                    "optimizer": "adam",
                    "strategy": req.strategy,
                },
            )
            await self._update(run.run_id, result_version=mv.version)
            ref = ModelRef(mv.model, mv.version)
            if req.variants:
                await asyncio.to_thread(self.pipeline.quantize, ref, list(req.variants))
            if req.then_deploy:
                assert self.rollouts is not None
                await self._update(run.run_id, status="deploying")
                result = await start_canary(
                    self.rollouts,
                    ref,
                    req.selector,
                    CanaryPlan.parse(req.then_deploy),
                    timeout=req.deploy_timeout,
                )
                await self._update(run.run_id, deploy=result.to_dict())
                if not result.ok:
                    raise Unavailable(
                        f"{mv.ref} registered, but the canary stage of rollout "
                        f"{result.rollout_id} is {result.stage} ({result.state}"
                        f"{': ' + result.reason if result.reason else ''}): {result.states}"
                    )
            await self._update(run.run_id, status="succeeded")
        except FleetError as e:
            logger.warning("federated run %s failed: %s", run.run_id, e)
            await self._update(run.run_id, status="failed", reason=str(e))
        except asyncio.CancelledError:
            await asyncio.shield(
                self._update(run.run_id, status="failed", reason="the coordinator stopped")
            )
            raise
        except Exception as e:  # the run's supervisor: record any bug as the run's failure
            logger.exception("federated run %s crashed", run.run_id)
            await self._update(run.run_id, status="failed", reason=f"{type(e).__name__}: {e}")
        finally:
            if flower_id is not None and not finished and self.superlink is not None:
                await asyncio.to_thread(self.superlink.stop_run, flower_id)

    async def _follow(
        self, run: FlRun, req: RunRequest, flower_id: int, out: Path
    ) -> dict[str, Any]:
        """Stream the journal into the run's row until `done`; raise on `failed`."""
        loop = asyncio.get_running_loop()
        limit = req.join_timeout + req.rounds * (2 * req.round_timeout + 60) + 120
        deadline = loop.time() + limit
        next_status = loop.time() + STATUS_EVERY
        offset = 0
        ended = ""
        while True:
            events, offset = await asyncio.to_thread(read_events, out / EVENTS_FILE, offset)
            for ev in events:
                kind = ev.get("event")
                if kind == "participants":
                    absent = ev.get("skipped") or {}
                    await self._update(
                        run.run_id,
                        participants=list(ev.get("devices") or []),
                        skipped={**run.skipped, **absent},
                    )
                elif kind == "round":
                    await self._update(run.run_id, history_append=ev)
                elif kind == "failed":
                    raise Unavailable(f"Flower run {flower_id}: {ev.get('reason', 'failed')}")
                elif kind == "done":
                    return ev
            if ended:
                tail = await asyncio.to_thread(self._require().run_log, flower_id, 5)
                raise Unavailable(
                    f"Flower run {flower_id} ended ({ended}) without a result; its log ends: {tail}"
                )
            now = loop.time()
            if now >= deadline:
                raise Unavailable(f"federated run did not finish within {limit:.0f}s; stopped it")
            if now >= next_status:
                next_status = now + STATUS_EVERY
                status = await asyncio.to_thread(self._require().run_status, flower_id)
                if status.startswith("finished"):
                    ended = status  # read the journal once more before giving up
                    continue
            await asyncio.sleep(POLL)

    async def watch(self, run_id: str) -> AsyncIterator[FlRun]:
        """The run now, then again each time it changes, until it is final."""
        async for run in watch_run(self.store, run_id, self._wait_changed):
            yield run

    async def _wait_changed(self) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._changed.wait()


async def watch_run(
    store: FlStore, run_id: str, wait: Callable[[], Awaitable[None]]
) -> AsyncIterator[FlRun]:
    """Run `run_id` as `store` has it now, then again each time it changes (looked at
    after each `wait()`), until it is final. The federation wakes it on each change; a
    replica without the federation (a follower) reads what the leader writes, once a second."""
    last: tuple[str, int, int | None] | None = None
    while True:
        run = await asyncio.to_thread(store.get_run, run_id)
        key = (run.status, len(run.history), run.result_version)
        if key != last:
            last = key
            yield run
        if run.final:
            return
        await wait()


def _config(req: RunRequest) -> dict[str, Any]:
    return {
        "min_clients": req.min_clients,
        "fraction": req.fraction,
        "local_epochs": req.local_epochs,
        "lr": req.lr,
        "dp": req.dp,
        "selector": str(req.selector),
        "then_deploy": req.then_deploy,
        "round_timeout": req.round_timeout,
        "join_timeout": req.join_timeout,
        "min_samples": req.min_samples,
        "idle_only": req.idle_only,
        "variants": list(req.variants),
    }


def _lineage(run: FlRun, req: RunRequest, flower_id: int, done: dict[str, Any]) -> dict[str, Any]:
    answered = sorted({d for h in run.history for d in h.get("participants", [])})
    return {
        "run_id": run.run_id,
        "flower_run_id": str(flower_id),
        "strategy": req.strategy,
        "rounds": req.rounds,
        "participants": answered,
        "chosen": list(run.participants),
        "min_clients": req.min_clients,
        "fraction": req.fraction,
        "local_epochs": req.local_epochs,
        "dp": req.dp,
        "per_round": [
            {
                "round": h.get("round"),
                "participants": h.get("participants", []),
                **{k: v for k, v in (h.get("evaluate") or {}).items()},
            }
            for h in run.history
        ],
        "seconds": done.get("seconds"),
    }
