"""`fleet serve --replica`: what `cloud.serve` asks of replica mode (its hooks).

`ReplicaMode(settings, local)` checks the settings first (PostgreSQL, s3://, an
external broker: one line naming what is accepted otherwise), then hands serve the
coordinator and monitoring classes a replica uses, a telemetry client id of its own,
and `run()`, which replaces the single coordinator's rollout controller task: the
election loop, with the leader's work in each term.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from edgefleet.cloud.config import CloudSettings
from edgefleet.cloud.replicas.lease import Fence, LeaderLease
from edgefleet.cloud.replicas.registry import ReplicaStore
from edgefleet.cloud.replicas.runtime import (
    Elector,
    ReplicaCoordinator,
    ReplicaMonitoring,
    check_replica_settings,
    default_replica_id,
    fl_elsewhere,
)

if TYPE_CHECKING:
    from edgefleet.cloud.coordinator import Coordinator
    from edgefleet.cloud.monitoring import Monitoring
    from edgefleet.cloud.services.wiring import Services

logger = logging.getLogger(__name__)


class ReplicaMode:
    coordinator_class = ReplicaCoordinator
    monitoring_class = ReplicaMonitoring

    def __init__(self, settings: CloudSettings, local: Services) -> None:
        check_replica_settings(settings)
        self.settings = settings
        self.local = local
        self.replica_id: str = settings.replica_id or default_replica_id()
        #: HOST:PORT of this replica's FleetService, once it listens (`listening`)
        self.address = ""
        #: the FederatedServicer, handed the federation while this replica leads
        self.fl_servicer: Any = None
        self.lease = LeaderLease(local.database, self.replica_id, lease_s=settings.lease_s)
        self.registry = ReplicaStore(local.database)
        self.elector: Elector | None = None
        # pause/resume/abort through any replica and the leader's controller write the
        # same rows from different processes: each write must start from the latest
        local.rollouts.optimistic = True

    def listening(self, grpc: str) -> None:
        """FleetService listens at `grpc` (HOST:PORT as serve reaches it): the address
        shown in `fleet status`, this host's name when it listens on every address."""
        host, _, port = grpc.rpartition(":")
        if self.settings.grpc_listen.rpartition(":")[0] in ("0.0.0.0", "[::]", "::"):
            host = socket.getfqdn()
        self.address = f"{host}:{port}"

    def fl_elsewhere(self) -> str | None:
        """For the FederatedServicer while this replica has no federation: with `--fl`,
        where federated learning runs instead (the leader); without, None (FL is off)."""
        if not self.settings.fl:
            return None
        return fl_elsewhere(self.registry, self.replica_id)

    @property
    def telemetry_home(self) -> str:
        """What the telemetry client id is derived from: the home and the replica, so two
        replicas sharing a home's copy do not take each other's MQTT session."""
        return f"{self.settings.home_dir}#{self.replica_id}"

    async def run(self, coordinator: Coordinator, monitoring: Monitoring) -> None:
        """Until cancelled: heartbeat, election, and the leader's work while leading.
        `coordinator` and `monitoring` are this mode's classes (serve builds them)."""
        if not isinstance(coordinator, ReplicaCoordinator) or not isinstance(
            monitoring, ReplicaMonitoring
        ):
            raise TypeError("replica mode runs over ReplicaCoordinator and ReplicaMonitoring")

        async def lead(fence: Fence) -> None:
            from edgefleet.cloud.rollouts.controller import RolloutController
            from edgefleet.cloud.rollouts.store import RolloutStore

            store = RolloutStore(self.local.database)
            store.fence = fence.check
            store.optimistic = True
            controller = RolloutController(coordinator, store)
            federation = None
            if self.settings.fl:
                from edgefleet.cloud.serve import start_federation

                federation = await start_federation(self.settings, self.local, controller)
                if self.fl_servicer is not None:
                    self.fl_servicer._federation = federation  # serve's servicer, this term
            coordinator.lead(True)
            try:
                await asyncio.gather(controller.run(), monitoring.leader_loops())
            finally:
                coordinator.lead(False)
                if federation is not None:
                    if self.fl_servicer is not None:
                        self.fl_servicer._federation = None
                    await federation.stop()
                    federation.store.close()

        self.elector = Elector(self.lease, self.registry, address=lambda: self.address, lead=lead)
        logger.info(
            "replica %s: lease %.1fs on %s",
            self.replica_id,
            self.lease.lease_s,
            self.local.database.url,
        )
        try:
            await self.elector.run()
        finally:
            await asyncio.to_thread(self.lease.close)


__all__ = ["ReplicaMode"]
