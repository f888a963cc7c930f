"""FederatedService (protos/fleet/v1/federated.proto) on the coordinator's grpc.aio server.

Conversions between `FlRun` / `FlEnrollment` and the protobuf messages are in
`cloud.api.convert`, shared with `cloud.fl.remote`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from edgefleet.cloud.api.convert import (
    enrollment_to_pb,
    request_from_pb,
    run_to_pb,
)
from edgefleet.cloud.fl.federation import Federation, watch_run
from edgefleet.cloud.fl.store import FlStore
from edgefleet.protos.errors import Conflict, Unavailable
from edgefleet.protos.fleet.v1 import federated_pb2, federated_pb2_grpc


class FederatedServicer(federated_pb2_grpc.FederatedServiceServicer):
    """Serves runs of `federation`; with None (FL off) every call says how to turn it on.

    `elsewhere` (replicas): asked (in a thread) while this process has no federation;
    a line saying where federated learning runs instead (a follower names the leader),
    answered as `Unavailable`, or None for the plain "off" answer. `runs` (replicas with
    --fl): the shared database's runs, which a follower serves to GetRun, ListRuns and
    WatchRun; starting a run and enrolling a node stay the leader's."""

    def __init__(
        self,
        federation: Federation | None,
        *,
        elsewhere: Callable[[], str | None] | None = None,
        runs: FlStore | None = None,
    ) -> None:
        self._federation = federation
        self.elsewhere = elsewhere
        self.runs = runs

    async def store(self) -> FlStore:
        """Where runs are read: the federation's store, else `runs` (a follower replica
        reads the runs its leader writes to the shared database), else refused as any call."""
        if self._federation is None and self.runs is not None:
            return self.runs
        return (await self.federation()).store

    async def federation(self) -> Federation:
        fed = self._federation
        if fed is not None:
            return fed
        if self.elsewhere is not None:
            why = await asyncio.to_thread(self.elsewhere)
            if why is not None:
                raise Unavailable(why)
        raise Conflict(
            "federated learning is off on this coordinator: restart it with 'fleet serve --fl'"
        )

    async def StartRun(
        self, request: federated_pb2.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[federated_pb2.RunInfo]:
        fed = await self.federation()
        run = await fed.start_run(request_from_pb(request))
        async for r in fed.watch(run.run_id):
            yield run_to_pb(r)

    async def WatchRun(
        self, request: federated_pb2.RunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[federated_pb2.RunInfo]:
        fed = self._federation
        runs = (
            fed.watch(request.run_id)
            if fed is not None
            else watch_run(await self.store(), request.run_id, lambda: asyncio.sleep(1.0))
        )
        async for r in runs:
            yield run_to_pb(r)

    async def GetRun(
        self, request: federated_pb2.RunRequest, context: grpc.aio.ServicerContext
    ) -> federated_pb2.RunInfo:
        store = await self.store()
        return run_to_pb(await asyncio.to_thread(store.get_run, request.run_id))

    async def ListRuns(
        self, request: federated_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> federated_pb2.ListRunsResponse:
        store = await self.store()
        runs = await asyncio.to_thread(
            lambda: store.list_runs(model=request.model or None, limit=request.limit or 50)
        )
        return federated_pb2.ListRunsResponse(runs=[run_to_pb(r) for r in runs])

    async def EnrollNode(
        self, request: federated_pb2.EnrollNodeRequest, context: grpc.aio.ServicerContext
    ) -> federated_pb2.NodeEnrollment:
        return enrollment_to_pb(await (await self.federation()).enroll(request.device_id))
