"""FederatedService (protos/fleet/v1/federated.proto) on the coordinator's grpc.aio server.

Conversions between `FlRun` / `FlEnrollment` and the protobuf messages live
here in both directions, so `cloud.fl.remote` and this server agree on them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc

from edgefleet.cloud.devices import Selector
from edgefleet.cloud.fl.federation import Federation, FlEnrollment, RunRequest
from edgefleet.cloud.fl.store import FlRun
from edgefleet.cloud.grpc_service import _Mapped
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.variants import DEFAULT_VARIANTS
from edgefleet.protos.errors import Conflict
from edgefleet.protos.fleet.v1 import federated_pb2, federated_pb2_grpc


def _ms(dt: datetime | None) -> int:
    return int(dt.timestamp() * 1000) if dt is not None else 0


def run_to_pb(r: FlRun) -> federated_pb2.RunInfo:
    return federated_pb2.RunInfo(
        run_id=r.run_id,
        model=r.model,
        parent_version=r.parent_version,
        strategy=r.strategy,
        rounds=r.rounds,
        status=r.status,
        reason=r.reason,
        participants=list(r.participants),
        skipped=dict(r.skipped),
        history_json=json.dumps([dict(h) for h in r.history], sort_keys=True),
        flower_run_id=str(r.flower_run_id or ""),
        result_version=r.result_version or 0,
        deploy_json=json.dumps(dict(r.deploy), sort_keys=True),
        config_json=json.dumps(dict(r.config), sort_keys=True),
        created_at_ms=_ms(r.created_at),
        finished_at_ms=_ms(r.finished_at),
    )


def run_from_pb(m: federated_pb2.RunInfo) -> FlRun:
    def when(ms: int) -> datetime | None:
        return datetime.fromtimestamp(ms / 1000, UTC) if ms else None

    return FlRun(
        run_id=m.run_id,
        model=m.model,
        parent_version=m.parent_version,
        strategy=m.strategy,
        rounds=m.rounds,
        config=json.loads(m.config_json or "{}"),
        status=m.status,
        reason=m.reason,
        participants=tuple(m.participants),
        skipped=dict(m.skipped),
        history=tuple(json.loads(m.history_json or "[]")),
        flower_run_id=int(m.flower_run_id) if m.flower_run_id else None,
        result_version=m.result_version or None,
        deploy=json.loads(m.deploy_json or "{}"),
        created_at=when(m.created_at_ms) or datetime.now(UTC),
        finished_at=when(m.finished_at_ms),
    )


def request_to_pb(req: RunRequest) -> federated_pb2.StartRunRequest:
    return federated_pb2.StartRunRequest(
        ref=str(req.ref),
        rounds=req.rounds,
        strategy=req.strategy,
        min_clients=req.min_clients,
        fraction=req.fraction,
        local_epochs=req.local_epochs,
        lr=req.lr,
        dp_clip=req.dp_clip,
        dp_noise=req.dp_noise,
        selector=str(req.selector),
        then_deploy=req.then_deploy,
        round_timeout=req.round_timeout,
        join_timeout=req.join_timeout,
        min_samples=req.min_samples,
        idle_only=req.idle_only,
        variants=list(req.variants),
        deploy_timeout=req.deploy_timeout,
    )


def request_from_pb(m: federated_pb2.StartRunRequest) -> RunRequest:
    d = RunRequest(ref=ModelRef.parse(m.ref))
    return RunRequest(
        ref=d.ref,
        rounds=m.rounds or d.rounds,
        strategy=m.strategy or d.strategy,
        min_clients=m.min_clients or d.min_clients,
        fraction=m.fraction or d.fraction,
        local_epochs=m.local_epochs or d.local_epochs,
        lr=m.lr or d.lr,
        dp_clip=m.dp_clip,
        dp_noise=m.dp_noise,
        selector=Selector.parse(m.selector or "all"),
        then_deploy=m.then_deploy,
        round_timeout=m.round_timeout or d.round_timeout,
        join_timeout=m.join_timeout or d.join_timeout,
        min_samples=m.min_samples or d.min_samples,
        idle_only=m.idle_only,
        variants=tuple(m.variants) if m.variants else DEFAULT_VARIANTS,
        deploy_timeout=m.deploy_timeout or d.deploy_timeout,
    )


def enrollment_to_pb(e: FlEnrollment) -> federated_pb2.NodeEnrollment:
    return federated_pb2.NodeEnrollment(
        device_id=e.device_id,
        superlink=e.superlink,
        ca_certificate=e.ca_certificate,
        private_key=e.private_key,
        node_id=str(e.node_id or ""),
    )


def enrollment_from_pb(m: federated_pb2.NodeEnrollment) -> FlEnrollment:
    return FlEnrollment(
        m.device_id,
        m.superlink,
        m.ca_certificate,
        m.private_key,
        int(m.node_id) if m.node_id else None,
    )


class FederatedServicer(federated_pb2_grpc.FederatedServiceServicer):
    """Serves runs of `federation`; with None (FL off) every call says how to turn it on."""

    def __init__(self, federation: Federation | None) -> None:
        self._federation = federation

    @property
    def federation(self) -> Federation:
        if self._federation is None:
            raise Conflict(
                "federated learning is off on this coordinator: restart it with 'fleet serve --fl'"
            )
        return self._federation

    async def StartRun(
        self, request: federated_pb2.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[federated_pb2.RunInfo]:
        async with _Mapped(context):
            run = await self.federation.start_run(request_from_pb(request))
            async for r in self.federation.watch(run.run_id):
                yield run_to_pb(r)

    async def WatchRun(
        self, request: federated_pb2.RunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[federated_pb2.RunInfo]:
        async with _Mapped(context):
            async for r in self.federation.watch(request.run_id):
                yield run_to_pb(r)

    async def GetRun(
        self, request: federated_pb2.RunRequest, context: grpc.aio.ServicerContext
    ) -> federated_pb2.RunInfo:
        import asyncio

        async with _Mapped(context):
            return run_to_pb(await asyncio.to_thread(self.federation.store.get_run, request.run_id))

    async def ListRuns(
        self, request: federated_pb2.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> federated_pb2.ListRunsResponse:
        import asyncio

        async with _Mapped(context):
            runs = await asyncio.to_thread(
                lambda: self.federation.store.list_runs(
                    model=request.model or None, limit=request.limit or 50
                )
            )
            return federated_pb2.ListRunsResponse(runs=[run_to_pb(r) for r in runs])

    async def EnrollNode(
        self, request: federated_pb2.EnrollNodeRequest, context: grpc.aio.ServicerContext
    ) -> federated_pb2.NodeEnrollment:
        async with _Mapped(context):
            return enrollment_to_pb(await self.federation.enroll(request.device_id))
