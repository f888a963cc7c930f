"""`LiveRollouts`: what needs a running coordinator (its rollout controller), async.

Rollouts are created and acted on by the controller; `watch` is the wait loop a
watcher of a rollout runs (it wakes on the controller's passes, so a change is seen
as soon as the controller made it). The `FleetService` servicer adapts these to gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from edgefleet.cloud.devices import Selector
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice, RolloutStore
from edgefleet.cloud.rollouts.controller import RolloutController
from edgefleet.cloud.services.fleet import changed
from edgefleet.protos.errors import Unavailable


class LiveRollouts:
    def __init__(
        self,
        rollouts: RolloutStore,
        controller: RolloutController | None,
        *,
        watch_interval: float = 0.5,
    ) -> None:
        self.rollouts = rollouts
        self.controller = controller
        self.watch_interval = watch_interval

    def _controller(self) -> RolloutController:
        if self.controller is None:
            raise Unavailable("this coordinator runs no rollout controller")
        return self.controller

    async def create(
        self, ref: ModelRef, selector: Selector, policy: Policy | None, *, dry_run: bool
    ) -> tuple[Rollout, list[RolloutDevice]]:
        """A new rollout the controller runs (a plain deploy: `Policy.all_at_once`)."""
        return await self._controller().create(
            ref, selector, policy or Policy.all_at_once(), dry_run=dry_run
        )

    async def control(self, rollout_id: str, action: str) -> Rollout:
        return await self._controller().control(rollout_id, action)

    async def watch(self, rollout_id: str) -> AsyncIterator[Rollout]:
        """The rollout now, then whenever it changes, until it is final."""
        last: Rollout | None = None
        while True:
            r = await asyncio.to_thread(self.rollouts.get, rollout_id)
            if last is None or changed(last, r):
                last = r
                yield r
            if r.final:
                return
            if self.controller is not None:
                await self.controller.wait_changed(self.watch_interval * 4)
            else:
                await asyncio.sleep(self.watch_interval)
