"""FleetService (protos/fleet/v1/fleet.proto) on grpc.aio, in the coordinator's event loop.

A thin adapter: requests are decoded (`cloud.api.convert`), the work is the application
layer's (`FleetApp` in worker threads, `LiveRollouts` for what the rollout controller
does), the answers encoded. Tokens, roles and the audit log are `AccessInterceptor`'s;
a FleetError raised here becomes its gRPC status in `ErrorInterceptor` (cloud/api/errors.py)
and comes back as the same class in `cloud.remote`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import grpc

from edgefleet.cloud.api.convert import (
    bundle_to_pb,
    device_to_pb,
    policy_from_pb,
    replica_to_pb,
    rollout_to_pb,
    summary_to_pb,
    version_to_pb,
)
from edgefleet.cloud.devices import DeviceFilter, DeviceSpec, Selector
from edgefleet.cloud.drift.convert import alert_to_pb, drift_to_pb
from edgefleet.cloud.registry import ModelRef, ModelVersion
from edgefleet.cloud.registry.entities import check_model_name, check_stage
from edgefleet.cloud.services.fleet import FleetApp
from edgefleet.cloud.services.live import LiveRollouts
from edgefleet.cloud.services.values import EnrolledBatch, EpochProgress
from edgefleet.cloud.variants import parse_variants
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

logger = logging.getLogger(__name__)

Push = Callable[[fleet_pb2.Progress], None]

#: bundles per EnrollDevices answer message (~4 KB each: well under the message limit)
ENROLL_PAGE = 500


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    def __init__(self, app: FleetApp, live: LiveRollouts, *, advertise_broker: str) -> None:
        self.app = app
        self.live = live
        self.advertise_broker = advertise_broker

    # -- models

    async def ListModels(
        self, request: fleet_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListModelsResponse:
        models = await asyncio.to_thread(self.app.list_models)
        return fleet_pb2.ListModelsResponse(models=[summary_to_pb(m) for m in models])

    async def ListVersions(
        self, request: fleet_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListVersionsResponse:
        name = check_model_name(request.model)
        versions = await asyncio.to_thread(self.app.list_versions, name)
        return fleet_pb2.ListVersionsResponse(versions=[version_to_pb(v) for v in versions])

    async def GetVersion(
        self, request: fleet_pb2.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ModelVersionInfo:
        mv = await asyncio.to_thread(self.app.get_version, ModelRef.parse(request.ref))
        return version_to_pb(mv)

    async def Promote(
        self, request: fleet_pb2.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.PromoteResponse:
        stage = check_stage(request.stage or "production")
        ref = ModelRef.parse(request.ref)
        mv, archived = await asyncio.to_thread(
            lambda: self.app.promote(ref, stage, archive_existing=not request.keep_existing)
        )
        logger.info(
            "promoted %s:%d to %s (archived %s)", mv.model, mv.version, stage, archived or "-"
        )
        return fleet_pb2.PromoteResponse(version=version_to_pb(mv), archived=archived)

    async def Verify(
        self, request: fleet_pb2.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.VerifyResponse:
        mv, results = await asyncio.to_thread(self.app.verify, ModelRef.parse(request.ref))
        return fleet_pb2.VerifyResponse(
            version=version_to_pb(mv),
            results=[
                fleet_pb2.VerifyResult(artifact=r.variant, ok=r.ok, detail=r.detail)
                for r in results
            ],
        )

    async def Train(
        self, request: fleet_pb2.TrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.Progress]:
        name = check_model_name(request.model)

        def work(push: Push) -> ModelVersion:
            def on_epoch(stat: EpochProgress) -> None:
                push(
                    fleet_pb2.Progress(
                        step="epoch",
                        done=int(stat.epoch),
                        total=int(stat.epochs),
                        fields={
                            "loss": repr(float(stat.loss)),
                            "train_accuracy": repr(float(stat.train_accuracy)),
                        },
                    )
                )

            return self.app.train(
                name,
                request.data or "digits",
                arch=request.arch or "mlp",
                epochs=request.epochs or 20,
                seed=request.seed,
                batch_size=request.batch_size or 64,
                lr=request.lr or 3e-3,
                on_epoch=on_epoch,
            )

        async for p in _in_thread(work):
            yield p

    async def Quantize(
        self, request: fleet_pb2.QuantizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.Progress]:
        if not request.variants:
            raise InvalidArgument("quantize: no variants named; e.g. int8, fp16, tflite-int8")
        parse_variants(",".join(request.variants))
        ref = ModelRef.parse(request.ref)

        def work(push: Push) -> ModelVersion:
            def progress(what: str, done: int, total: int) -> None:
                push(fleet_pb2.Progress(step=what, done=done, total=total))

            return self.app.quantize(
                ref,
                list(request.variants),
                max_drop=request.max_drop,
                force=request.force,
                progress=progress,
            )

        async for p in _in_thread(work):
            yield p

    # -- devices

    async def ListDevices(
        self, request: fleet_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListDevicesResponse:
        selector = Selector.parse(request.selector) if request.selector else None
        where = dataclasses.replace(
            DeviceFilter.parse(group=request.group, version=request.version),
            connectivity=request.connectivity,
            stale_s=request.stale_s,
        )
        devices = await asyncio.to_thread(
            lambda: self.app.list_devices(
                selector,
                state=request.state or None,
                online_only=request.online_only,
                where=where,
            )
        )
        return fleet_pb2.ListDevicesResponse(devices=[device_to_pb(d) for d in devices])

    async def GetDevice(
        self, request: fleet_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.DeviceInfo:
        return device_to_pb(await asyncio.to_thread(self.app.get_device, request.device_id))

    async def EnrollDevice(
        self, request: fleet_pb2.EnrollDeviceRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.EnrollmentBundle:
        b = await asyncio.to_thread(
            lambda: self.app.enroll_device(
                request.device_id,
                group=request.group,
                tags=dict(request.tags),
                broker_url=self.advertise_broker,
            )
        )
        logger.info("enrolled %s (group %r)", b.device_id, b.group)
        return bundle_to_pb(b)

    async def EnrollDevices(
        self, request: fleet_pb2.EnrollDevicesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.EnrollDevicesReply]:
        specs = [DeviceSpec(d.device_id, d.group, dict(d.tags)) for d in request.devices]
        batch = await asyncio.to_thread(
            lambda: self.app.enroll_devices(
                specs, broker_url=self.advertise_broker, skip_existing=request.skip_existing
            )
        )
        logger.info(
            "enrolled %d devices in one batch (%d enrolled before, left as they were)",
            len(batch.bundles),
            len(batch.existing),
        )
        for page in _pages(batch):
            yield page

    async def ReissueDevices(
        self, request: fleet_pb2.ReissueDevicesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.EnrollDevicesReply]:
        batch = await asyncio.to_thread(
            lambda: self.app.reissue_devices(
                list(request.device_ids), broker_url=self.advertise_broker
            )
        )
        logger.info("reissued the credentials of %d devices", len(batch.bundles))
        for page in _pages(batch):
            yield page

    async def Status(
        self, request: fleet_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.StatusResponse:
        st = await asyncio.to_thread(
            lambda: self.app.status(coordinator="", broker_url=self.advertise_broker)
        )
        return fleet_pb2.StatusResponse(
            coordinator_version=st.coordinator_version,
            broker_url=st.broker_url,
            devices=st.devices,
            online=st.online,
            by_state=dict(st.by_state),
            replicas=[replica_to_pb(r) for r in st.replicas],
        )

    # -- drift

    async def GetDrift(
        self, request: fleet_pb2.GetDriftRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.GetDriftResponse:
        rows = await asyncio.to_thread(
            lambda: self.app.drift(by=request.by or "group", model=request.model or None)
        )
        return fleet_pb2.GetDriftResponse(rows=[drift_to_pb(r) for r in rows])

    async def ListAlerts(
        self, request: fleet_pb2.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListAlertsResponse:
        found = await asyncio.to_thread(lambda: self.app.alerts(include_resolved=request.all))
        return fleet_pb2.ListAlertsResponse(alerts=[alert_to_pb(a) for a in found])

    # -- rollouts

    async def ListRollouts(
        self, request: fleet_pb2.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListRolloutsResponse:
        found = await asyncio.to_thread(
            lambda: self.app.list_rollouts(active_only=request.active_only)
        )
        return fleet_pb2.ListRolloutsResponse(rollouts=[rollout_to_pb(r) for r in found])

    async def GetRollout(
        self, request: fleet_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RolloutInfo:
        r, devs = await asyncio.to_thread(self.app.get_rollout, request.rollout_id)
        return rollout_to_pb(r, devs)

    async def WatchRollout(
        self, request: fleet_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.RolloutInfo]:
        async for r in self.live.watch(request.rollout_id):
            yield rollout_to_pb(r)

    async def ControlRollout(
        self, request: fleet_pb2.ControlRolloutRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RolloutInfo:
        return rollout_to_pb(await self.live.control(request.rollout_id, request.action))

    async def Deploy(
        self, request: fleet_pb2.DeployRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.Progress]:
        """Every deploy is a rollout the controller runs (a plain one: `Policy.all_at_once`),
        stored, listed and watchable; this answers once it is created (WatchRollout follows)."""
        ref = ModelRef.parse(request.ref)
        selector = Selector.parse(request.selector or "all")
        policy = policy_from_pb(request.policy) if request.HasField("policy") else None
        r, devs = await self.live.create(ref, selector, policy, dry_run=request.dry_run)
        yield fleet_pb2.Progress(
            step="rollout",
            done=0,
            total=sum(s.devices for s in r.stages),
            rollout=rollout_to_pb(r, devs if request.dry_run else ()),
        )


async def _in_thread(work: Callable[[Push], ModelVersion]) -> AsyncIterator[fleet_pb2.Progress]:
    """Run a blocking pipeline step in a thread; yield its progress, then the version."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[fleet_pb2.Progress] = asyncio.Queue()

    def push(p: fleet_pb2.Progress) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, p)

    task = asyncio.ensure_future(asyncio.to_thread(work, push))
    while not task.done():
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
        else:
            getter.cancel()
    while not queue.empty():
        yield queue.get_nowait()
    mv = task.result()
    yield fleet_pb2.Progress(step="done", done=1, total=1, version=version_to_pb(mv))


def _pages(batch: EnrolledBatch) -> Iterator[fleet_pb2.EnrollDevicesReply]:
    """An enrolment answer in pages of `ENROLL_PAGE` bundles; the first lists the ids
    left as they were."""
    yield fleet_pb2.EnrollDevicesReply(
        bundles=[bundle_to_pb(b) for b in batch.bundles[:ENROLL_PAGE]],
        existing=list(batch.existing),
    )
    for i in range(ENROLL_PAGE, len(batch.bundles), ENROLL_PAGE):
        yield fleet_pb2.EnrollDevicesReply(
            bundles=[bundle_to_pb(b) for b in batch.bundles[i : i + ENROLL_PAGE]]
        )
