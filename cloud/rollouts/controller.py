"""The rollout controller: runs inside the coordinator and moves rollouts forward.

Every step reads the rollout and its devices from the database, looks at what
the devices reported, decides, and writes the outcome back before the next step.
Nothing the controller knows lives only in memory, so a coordinator restarted
mid-rollout carries on where it was: `RolloutStore.issue` hands back the
generation and desired state already given to a device instead of a new one, and
on start the controller publishes the current step's desired states again (the
agents ignore a generation they already have).

Per stage: the candidate goes to the stage's devices as a *shadow* (downloaded,
verified, loaded and self-tested beside the serving model, and evaluated on
sampled live inputs); once they have settled the install gates are checked; the
stage bakes for `policy.bake_s` while shadow reports come in; the quality gates
are checked; the stage's devices activate the candidate (already on disk and
loaded: no download); the next stage starts. A failed gate rolls every device the
rollout touched back to what it served before (no download), or pauses the
rollout (`policy.on_failure`).

The controller sees the fleet only through `cloud.rollouts.fleet.RolloutFleet` (plan,
versions, sign and publish desired states, device reports, shadow reports, wait for a
change), which the `Coordinator` implements; its unit tests drive it with an
in-memory fake and its injectable clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgefleet.cloud.agent_releases import is_agent_release
from edgefleet.cloud.devices import Device, Selector
from edgefleet.cloud.devices.values import UpdateState
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.rollouts import gates as g
from edgefleet.cloud.rollouts.fleet import RolloutFleet
from edgefleet.cloud.rollouts.model import (
    ADVANCING,
    DevicePhase,
    Rollout,
    RolloutDevice,
    RolloutState,
    Stage,
    StageState,
    check_transition,
)
from edgefleet.cloud.rollouts.policy import Policy
from edgefleet.cloud.rollouts.store import RolloutStore
from edgefleet.cloud.selection import Plan
from edgefleet.protos.errors import Conflict, FleetError, InvalidArgument, NotFound, Unavailable

logger = logging.getLogger(__name__)

#: reported state that settles each action (besides "failed")
SETTLED = {
    "shadow": UpdateState.SHADOWING,
    "activate": UpdateState.ACTIVE,
    "rollback": UpdateState.ROLLED_BACK,
}
ACTIONS = ("pause", "resume", "abort", "rollback")
#: reason of a device a direct deploy did not wait for
OFFLINE = "offline"
OFFLINE_DETAIL = "desired state kept; it updates when it reconnects"


def plan_key(ref: str, selector: Selector | str) -> str:
    """What the stage order is keyed on: the version and the selector, never a random id,
    so a dry run plans the very canary and waves the real rollout then uses (while the
    selected devices stay the same)."""
    return f"{ref}@{selector}"


def plan_stages(
    key: str, device_ids: Sequence[str], policy: Policy
) -> tuple[list[Stage], dict[str, int]]:
    """Split the devices into stages: a stable pseudo-random order from `key` (see
    `plan_key`), cumulative counts per stage (the canary has at least one device), empty
    stages dropped."""
    order = sorted(device_ids, key=lambda d: hashlib.sha256(f"{key}/{d}".encode()).hexdigest())
    n = len(order)
    stages: list[Stage] = []
    assign: dict[str, int] = {}
    prev = 0
    for k, frac in enumerate(policy.stages):
        count = max(1, math.ceil(frac * n - 1e-9)) if n else 0
        count = min(n, count)
        if count <= prev:
            continue
        name = ("all" if frac == 1.0 else "canary") if k == 0 else f"wave {k}"
        for d in order[prev:count]:
            assign[d] = len(stages)
        stages.append(Stage(name=name, fraction=frac, devices=count - prev))
        prev = count
    return stages, assign


def build_rollout(
    plan: Plan, selector: Selector, policy: Policy, *, now: float, dry_run: bool = False
) -> tuple[Rollout, list[RolloutDevice]]:
    """A new rollout (pending) for a deploy plan, and its devices assigned to stages."""
    if not plan.targets:
        raise InvalidArgument(
            f"no selected device can run {plan.version.ref}: "
            + "; ".join(f"{d}: {why}" for d, why in list(plan.skipped.items())[:3])
        )
    rollout_id = uuid.uuid4().hex[:12]
    stages, assign = plan_stages(
        plan_key(plan.version.ref, selector), [d.device_id for d, _v in plan.targets], policy
    )
    devices = sorted(
        (
            RolloutDevice(
                rollout_id=rollout_id,
                device_id=d.device_id,
                stage=assign[d.device_id],
                variant=v.name,
                sha256=v.sha256,
                previous=d.active,
                last_seen=d.last_seen.timestamp() if d.last_seen else 0.0,
            )
            for d, v in plan.targets
        ),
        key=lambda x: (x.stage, x.device_id),
    )
    rollout = Rollout(
        rollout_id=rollout_id,
        ref=plan.version.ref,
        model=plan.version.model,
        version=plan.version.version,
        selector=str(selector),
        policy=policy,
        state=RolloutState.PENDING,
        stages=tuple(stages),
        created_at=now,
        updated_at=now,
        skipped=plan.skipped,
        dry_run=dry_run,
    )
    return rollout, devices


class RolloutController:
    def __init__(
        self,
        fleet: RolloutFleet,
        store: RolloutStore,
        *,
        interval: float = 0.5,
        min_gap: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.store = store
        self.interval = interval
        self.min_gap = min_gap
        self.clock = clock
        self._lock = asyncio.Lock()
        self._poke = asyncio.Event()
        self._changed = asyncio.Condition()

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Advance every unfinished rollout until cancelled."""
        await self._republish()
        while True:
            try:
                async with self._lock:
                    await self.tick()
            except FleetError as e:
                logger.warning("rollout controller: %s", e)
            except Exception:  # a bug must not stop every rollout: log it, try again
                logger.exception("rollout controller step failed; retrying")
            await self._sleep()

    async def _sleep(self) -> None:
        # at most one pass per `min_gap`: with a thousand devices reporting, "something
        # changed" is nearly always true
        await asyncio.sleep(self.min_gap)
        poke = asyncio.ensure_future(self._poke.wait())
        changed = asyncio.ensure_future(self.fleet.changed(self.interval))
        try:
            await asyncio.wait({poke, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            poke.cancel()
            changed.cancel()
        self._poke.clear()

    async def tick(self) -> None:
        for r in await asyncio.to_thread(self.store.find, active_only=True):
            try:
                await self._advance(r)
            except Conflict as e:  # changed by hand meanwhile: next tick sees it
                logger.info("rollout %s: %s", r.rollout_id, e)
        async with self._changed:
            self._changed.notify_all()

    async def wait_changed(self, timeout: float) -> None:
        """Return after the controller's next pass (or `timeout`)."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()

    async def _republish(self) -> None:
        """After a restart: publish the desired states of the steps in flight again."""
        for r in await asyncio.to_thread(self.store.find, active_only=True):
            devs = await asyncio.to_thread(self.store.devices, r.rollout_id)
            if r.state == RolloutState.ROLLING_BACK:
                step = [d for d in devs if d.action == "rollback" and not _settled(d)]
            else:
                step = [d for d in devs if d.stage == r.stage and d.action and not _settled(d)]
            if step:
                await self._issue(r, step, step[0].action, phase=step[0].phase)
                logger.info(
                    "rollout %s resumed at %s (%s): %d desired states re-published",
                    r.rollout_id,
                    r.current.name,
                    r.current.state,
                    len(step),
                )

    # -- create and control ----------------------------------------------------------

    async def create(
        self, ref: ModelRef, selector: Selector, policy: Policy, *, dry_run: bool = False
    ) -> tuple[Rollout, list[RolloutDevice]]:
        plan = await self.fleet.plan(ref, selector)
        rollout, devices = build_rollout(plan, selector, policy, now=self.clock(), dry_run=dry_run)
        if dry_run:
            return rollout, devices
        await self.check_free([d.device_id for d in devices])
        await self.fleet.prepare([v for _d, v in plan.targets])  # deltas: per stage, in _issue
        rollout = await asyncio.to_thread(self.store.create, rollout, devices)
        logger.info(
            "rollout %s: %s to %d devices in %d stages (%s)",
            rollout.rollout_id,
            rollout.ref,
            len(devices),
            len(rollout.stages),
            policy.describe(),
        )
        self._poke.set()
        return rollout, devices

    async def check_free(self, device_ids: Sequence[str]) -> None:
        """Conflict when an unfinished rollout already has one of these devices."""
        wanted = set(device_ids)
        for other in await asyncio.to_thread(self.store.find, active_only=True):
            busy = [
                d.device_id
                for d in await asyncio.to_thread(self.store.devices, other.rollout_id)
                if d.device_id in wanted
            ]
            if busy:
                raise Conflict(
                    f"device {busy[0]!r} ({len(busy)} in all) is in rollout {other.rollout_id} "
                    f"({other.ref}, {other.state}): wait for it, or abort or roll it back first"
                )

    async def control(self, rollout_id: str, action: str) -> Rollout:
        if action not in ACTIONS:
            raise InvalidArgument(
                f"rollout action {action!r} unknown; accepted: {', '.join(ACTIONS)}"
            )
        async with self._lock:
            r = await asyncio.to_thread(self.store.get, rollout_id)
            if action == "pause":
                check_transition(r.rollout_id, r.state, RolloutState.PAUSED)
                r = await self._save(
                    r.with_changes(state=RolloutState.PAUSED, reason="paused by hand")
                )
            elif action == "resume":
                r = await self._resume(r)
            elif action == "abort":
                r = await self._abort(r)
            else:
                check_transition(r.rollout_id, r.state, RolloutState.ROLLING_BACK)
                r = await self._start_rollback(r, "rolled back by hand")
        self._poke.set()
        return r

    async def _resume(self, r: Rollout) -> Rollout:
        target = RolloutState.CANARY if r.stage == 0 else RolloutState.ROLLING
        check_transition(r.rollout_id, r.state, target)
        st = r.current
        if st.state == StageState.FAILED:
            # a failed gate paused it: bake again and judge the quality gates again;
            # install failures are accepted by resuming
            st = st.with_changes(state=StageState.BAKING, bake_started_at=self.clock(), gates=())
        return await self._save(r.with_stage(r.stage, st).with_changes(state=target, reason=""))

    async def _abort(self, r: Rollout) -> Rollout:
        check_transition(r.rollout_id, r.state, RolloutState.ABORTED)
        devs = await asyncio.to_thread(self.store.devices, r.rollout_id)
        # devices still evaluating a shadow stop; devices already switched keep the version
        shadowing = [d for d in devs if d.action == "shadow" and d.phase == DevicePhase.SHADOW]
        await self._rollback_devices(r, shadowing)
        return await self._save(
            r.with_changes(
                state=RolloutState.ABORTED, reason="aborted by hand", finished_at=self.clock()
            )
        )

    # -- stepping --------------------------------------------------------------------

    async def _advance(self, r: Rollout) -> None:
        if r.state == RolloutState.PENDING:
            r = await self._save(r.with_changes(state=RolloutState.CANARY))
        if r.state in ADVANCING:
            await self._step_stage(r)
        elif r.state == RolloutState.ROLLING_BACK:
            await self._step_rollback(r)

    async def _step_stage(self, r: Rollout) -> None:
        i, st, now, p = r.stage, r.current, self.clock(), r.policy
        devs = _live(await asyncio.to_thread(self.store.devices, r.rollout_id, stages=[i]))
        if st.state == StageState.PENDING and p.direct:
            await self._issue(r, devs, "activate", phase=DevicePhase.ACTIVE)
            st = st.with_changes(state=StageState.ACTIVATING, started_at=now, activated_at=now)
            await self._save(r.with_stage(i, st))
            return
        if st.state == StageState.PENDING:
            await self._issue(r, devs, "shadow", phase=DevicePhase.SHADOW)
            st = st.with_changes(state=StageState.INSTALLING, started_at=now)
            await self._save(r.with_stage(i, st))
            return
        if st.state == StageState.INSTALLING:
            devs = await self._refresh(r, devs, "shadow", since=st.started_at)
            failed = sum(d.phase == DevicePhase.FAILED for d in devs)
            settled = all(_settled(d) for d in devs)
            st = st.with_changes(by_state=_by_state(devs))
            if settled or failed > g.failure_budget(p, len(devs)):
                results = g.install_gates(p, devs)
                if not all(x.ok for x in results):
                    await self._fail(r, st.with_changes(gates=tuple(results)))
                    return
                st = st.with_changes(
                    state=StageState.BAKING, bake_started_at=now, gates=tuple(results)
                )
            await self._save(r.with_stage(i, st))
            return
        if st.state == StageState.BAKING:
            devs = await self._refresh(r, devs, "shadow", since=st.started_at)
            # an agent release has no shadow samples: it is judged by its install gates
            # (installed beside the running agent and checked), then bakes
            q = (
                g.quality_gates(p, devs)
                if not is_agent_release(r.model)
                else g.Quality([], True, 0)
            )
            st = st.with_changes(by_state=_by_state(devs), samples=q.samples)
            if now - st.bake_started_at < p.bake_s or (
                not q.enough and now - st.bake_started_at < p.bake_s + p.stage_timeout_s
            ):
                await self._save(r.with_stage(i, st))
                return
            installed = [x for x in st.gates if x.name in ("failure_rate", "self_test")]
            st = st.with_changes(gates=(*installed, *q.gates))
            if not all(x.ok for x in q.gates):
                await self._fail(r, st)
                return
            ready = [d for d in devs if d.phase == DevicePhase.SHADOW]
            await self._issue(r, ready, "activate", phase=DevicePhase.ACTIVE)
            st = st.with_changes(state=StageState.ACTIVATING, activated_at=now)
            await self._save(r.with_stage(i, st))
            return
        if st.state == StageState.ACTIVATING:
            issued = [d for d in devs if d.action == "activate"]
            issued = await self._refresh(r, issued, "activate", since=st.activated_at)
            waiting = await self._offline(r, issued) if p.direct else set()
            devs = _live(await asyncio.to_thread(self.store.devices, r.rollout_id, stages=[i]))
            st = st.with_changes(by_state=_by_state(devs))
            if not all(_settled(d) or d.device_id in waiting for d in issued):
                await self._save(r.with_stage(i, st))
                return
            if is_agent_release(r.model) and issued:
                # a new agent that was not healthy after its switch (the device went back
                # to its old agent by itself) counts against the stage like an install
                switched = g.install_gates(p, issued)
                if not all(x.ok for x in switched):
                    await self._fail(r, st.with_changes(gates=tuple(switched)))
                    return
            st = st.with_changes(state=StageState.DONE, finished_at=now)
            r = r.with_stage(i, st)
            if i + 1 >= len(r.stages):
                await self._save(
                    r.with_changes(state=RolloutState.DONE, finished_at=now, reason="")
                )
                logger.info("rollout %s: done", r.rollout_id)
            else:
                await self._save(r.with_changes(state=RolloutState.ROLLING, stage=i + 1))
                logger.info(
                    "rollout %s: %s done; %s next", r.rollout_id, st.name, r.stages[i + 1].name
                )
                self._poke.set()

    async def _offline(self, r: Rollout, devs: Sequence[RolloutDevice]) -> set[str]:
        """Devices of a direct deploy that have not settled and are offline: their desired
        state stays retained (and in the database), they update when they reconnect, and
        the deploy does not wait for them."""
        open_ = [d for d in devs if not _settled(d)]
        if not open_:
            return set()
        found = await self.fleet.find_devices([d.device_id for d in open_])
        offline = {d.device_id for d in found if not d.online}
        note = {
            d.device_id: {"reason": OFFLINE, "detail": OFFLINE_DETAIL}
            for d in open_
            if d.device_id in offline and d.reason != OFFLINE
        }
        if note:
            await asyncio.to_thread(self.store.update_devices, r.rollout_id, note)
        return offline

    async def _fail(self, r: Rollout, st: Stage) -> None:
        bad = st.failed_gates
        reason = f"{st.name}: gate {', '.join(f'{x.name} ({x.detail})' for x in bad)} failed"
        r = r.with_stage(
            r.stage, st.with_changes(state=StageState.FAILED, finished_at=self.clock())
        )
        logger.warning("rollout %s: %s; %s", r.rollout_id, reason, r.policy.on_failure)
        if r.policy.on_failure == "pause":
            await self._save(r.with_changes(state=RolloutState.PAUSED, reason=reason))
        else:
            await self._start_rollback(r, reason)

    # -- rollback --------------------------------------------------------------------

    async def _start_rollback(self, r: Rollout, reason: str) -> Rollout:
        devs = await asyncio.to_thread(self.store.devices, r.rollout_id)
        touched = [d for d in devs if d.action and d.action != "rollback"]
        await self._rollback_devices(r, touched)
        stages = tuple(
            s.with_changes(state=StageState.ROLLED_BACK)
            if s.state not in (StageState.PENDING, StageState.FAILED)
            else s
            for s in r.stages
        )
        r = r.with_changes(state=RolloutState.ROLLING_BACK, reason=reason, stages=stages)
        r = await self._save(r)
        self._poke.set()
        return r

    async def _rollback_devices(self, r: Rollout, devs: Sequence[RolloutDevice]) -> None:
        """Tell each device to serve what it served before the rollout (no download)."""
        manifests: dict[str, tuple[bytes, str]] = {}
        cache: dict[tuple[str, int, str], tuple[bytes, str]] = {}
        if is_agent_release(r.model) and devs:
            # the device undoes the release it was given: drops the staged install, or
            # switches back to the agent it ran before (kept installed); no download
            mv = await self.fleet.get_version(ModelRef(r.model, r.version))
            by_name = {v.name: v for v in mv.variants}
            await self._issue(
                r,
                devs,
                "rollback",
                phase=DevicePhase.ROLLED_BACK,
                manifests={
                    d.device_id: (by_name[d.variant].signed_manifest, d.sha256) for d in devs
                },
            )
            return
        for d in devs:
            prev = d.previous
            if prev is None:
                continue
            key = (prev.model, prev.version, prev.variant)
            if key not in cache:
                try:
                    mv = await self.fleet.get_version(ModelRef(key[0], key[1]))
                    v = mv.variant(key[2])
                except (NotFound, InvalidArgument) as e:
                    logger.warning(
                        "rollout %s: cannot roll %s back: %s", r.rollout_id, d.device_id, e
                    )
                    continue
                cache[key] = (v.signed_manifest, v.sha256)
            manifests[d.device_id] = cache[key]
        without = [d.device_id for d in devs if d.device_id not in manifests]
        if without:
            await asyncio.to_thread(
                self.store.update_devices,
                r.rollout_id,
                {
                    dev: {"reason": "no_previous_model", "detail": "nothing to roll back to"}
                    for dev in without
                },
            )
        targets = [d for d in devs if d.device_id in manifests]
        if targets:
            await self._issue(
                r, targets, "rollback", phase=DevicePhase.ROLLED_BACK, manifests=manifests
            )

    async def _step_rollback(self, r: Rollout) -> None:
        devs = await asyncio.to_thread(self.store.devices, r.rollout_id)
        issued = [d for d in devs if d.action == "rollback"]
        issued = await self._refresh(r, issued, "rollback", since=r.updated_at)
        if all(_settled(d) for d in issued):
            now = self.clock()
            # each stage's device counts as they are now (not "shadowing" as when it failed)
            devs = await asyncio.to_thread(self.store.devices, r.rollout_id)
            stages = tuple(
                st.with_changes(by_state=_by_state([d for d in devs if d.stage == k]))
                if st.by_state
                else st
                for k, st in enumerate(r.stages)
            )
            await self._save(
                r.with_changes(state=RolloutState.ROLLED_BACK, finished_at=now, stages=stages)
            )
            logger.warning(
                "rollout %s: rolled back (%d devices) after: %s",
                r.rollout_id,
                len(issued),
                r.reason,
            )

    # -- devices ---------------------------------------------------------------------

    async def _issue(
        self,
        r: Rollout,
        devs: Sequence[RolloutDevice],
        action: str,
        *,
        phase: DevicePhase,
        manifests: Mapping[str, tuple[bytes, str]] | None = None,
    ) -> None:
        if not devs:
            return
        if manifests is None:
            mv = await self.fleet.get_version(ModelRef(r.model, r.version))
            by_name = {v.name: v for v in mv.variants}
            await self.fleet.prepare(
                [by_name[d.variant] for d in devs],
                {d.device_id: d.sha256 for d in devs} if action != "rollback" else None,
            )
            manifests = {d.device_id: (by_name[d.variant].signed_manifest, d.sha256) for d in devs}
        sign = self.fleet.signer(
            manifests, rollout_id=r.rollout_id, action=action, sample_rate=r.policy.sample_rate
        )
        issued = await asyncio.to_thread(
            self.store.issue, r.rollout_id, [d.device_id for d in devs], action, sign, phase=phase
        )
        try:
            await self.fleet.publish_desired(
                {dev: payload for dev, (_g, payload) in issued.items()}
            )
        except Unavailable as e:
            # issued (committed) but the broker is away: the step goes on regardless. The
            # database holds each desired state and the coordinator re-publishes the ones
            # not reached yet when its link is back (and every reassert interval); were
            # the step retried instead, a bake's devices would already be marked for
            # activation and the stage could never leave its bake
            logger.warning(
                "rollout %s: %d %s desired states issued but not published yet (%s); "
                "re-published when the broker is back",
                r.rollout_id,
                len(issued),
                action,
                e,
            )

    async def _refresh(
        self, r: Rollout, devs: Sequence[RolloutDevice], action: str, *, since: float
    ) -> list[RolloutDevice]:
        """Fold what the devices reported into their rollout rows (stored when changed)."""
        if not devs:
            return []
        now = self.clock()
        found = await self.fleet.find_devices([d.device_id for d in devs])
        by_id: dict[str, Device] = {d.device_id: d for d in found}
        ok_state = SETTLED[action]
        changes: dict[str, dict[str, Any]] = {}
        out: list[RolloutDevice] = []
        for d in devs:
            dev = by_id.get(d.device_id)
            new: dict[str, Any] = {}
            if dev is not None:
                seen = dev.last_seen.timestamp() if dev.last_seen else 0.0
                if seen and abs(seen - d.last_seen) > 1.0:
                    new["last_seen"] = seen
                if d.previous is None and (prev := dev.active) and prev.sha256 != d.sha256:
                    # planned before its report of what it serves arrived: learn it now,
                    # so a rollback can take it back there
                    new["previous"] = prev
                rep = dev.reported
                if rep and d.action == action and rep.generation >= d.generation > 0:
                    state = rep.state
                    if state != d.state:
                        new["state"] = state
                        new["reason"] = str(rep.reason)
                        new["detail"] = rep.detail[:500]
                    if state == UpdateState.FAILED and d.phase != DevicePhase.FAILED:
                        new["phase"] = DevicePhase.FAILED
                    elif state == ok_state and d.phase != _phase_for(action):
                        new["phase"] = _phase_for(action)
            report = self.fleet.shadow_report(d.device_id)
            if (
                action == "shadow"
                and report is not None
                and report.rollout_id == r.rollout_id
                and report.generation == d.generation
                and dict(d.shadow) != report.summary
            ):
                new["shadow"] = dict(report.summary)
            merged = d
            if new:
                changes[d.device_id] = new
                merged = _merge(d, new)
            if (
                not _settled(merged)
                and d.action == action
                and since
                and now - since > r.policy.stage_timeout_s
            ):
                last = merged.state or "no answer"
                timeout = {
                    "phase": DevicePhase.FAILED,
                    "state": "failed",
                    "reason": "timeout",
                    "detail": f"not settled within {r.policy.stage_timeout_s:.0f}s (last: {last})",
                }
                changes[d.device_id] = {**changes.get(d.device_id, {}), **timeout}
                merged = _merge(merged, timeout)
            out.append(merged)
        if changes:
            await asyncio.to_thread(self.store.update_devices, r.rollout_id, changes)
        return out

    async def _save(self, r: Rollout) -> Rollout:
        """Store the rollout, with every stage's estimated finish as of now."""
        etas = r.etas(self.clock())
        stages = tuple(st.with_changes(eta=e) for st, e in zip(r.stages, etas, strict=True))
        return await asyncio.to_thread(self.store.save, r.with_changes(stages=stages))


def _phase_for(action: str) -> DevicePhase:
    return {
        "shadow": DevicePhase.SHADOW,
        "activate": DevicePhase.ACTIVE,
        "rollback": DevicePhase.ROLLED_BACK,
    }[action]


def _live(devs: Sequence[RolloutDevice]) -> list[RolloutDevice]:
    """Devices still in the rollout: not skipped (a revoked or removed device's open
    state is closed as skipped by `fleet devices revoke|rm`)."""
    return [d for d in devs if d.phase != DevicePhase.SKIPPED]


def _settled(d: RolloutDevice) -> bool:
    if d.phase == DevicePhase.FAILED:
        return True
    return bool(d.action) and d.state == SETTLED.get(d.action)


def _merge(d: RolloutDevice, new: Mapping[str, Any]) -> RolloutDevice:
    from dataclasses import replace

    return replace(d, **new)


def _by_state(devs: Sequence[RolloutDevice]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in devs:
        key = (
            d.phase
            if d.phase in (DevicePhase.FAILED, DevicePhase.PENDING)
            else (d.state or "waiting")
        )
        out[key] = out.get(key, 0) + 1
    return out


__all__ = ["ACTIONS", "OFFLINE", "OFFLINE_DETAIL", "RolloutController", "plan_key", "plan_stages"]
