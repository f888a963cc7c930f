"""FleetService (protos/fleet/v1/fleet.proto) on grpc.aio, in the coordinator's event loop.

Every call must carry an API token as metadata `authorization: Bearer <token>`;
`cloud.access.interceptor.AccessInterceptor` checks it and the caller's role, and
records state-changing calls in the audit log. Registry and device-store calls go
to worker threads; `Deploy` drives the `Coordinator` and streams one `Progress`
per device reaching a final state, then a `DeployResult`. FleetErrors become gRPC
status codes (`protos.grpc_errors`) and come back as the same class in `cloud.remote`.

The conversions between values and `fleet_pb2` messages are `cloud.api.convert`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc

from edgefleet.cloud.api.convert import (
    bundle_to_pb,
    device_to_pb,
    policy_from_pb,
    rollout_to_pb,
    summary_to_pb,
    version_to_pb,
)
from edgefleet.cloud.client import LocalClient, coordinator_version
from edgefleet.cloud.devices import DeviceFilter, Selector
from edgefleet.cloud.registry import ModelRef, ModelVersion
from edgefleet.cloud.registry.entities import check_model_name, check_stage
from edgefleet.cloud.replicas.convert import replica_to_pb
from edgefleet.protos.errors import (
    FleetError,
    InvalidArgument,
    Unavailable,
)
from edgefleet.protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from edgefleet.protos.grpc_errors import grpc_status

if TYPE_CHECKING:
    from edgefleet.cloud.coordinator import Coordinator
    from edgefleet.cloud.rollouts.controller import RolloutController

logger = logging.getLogger(__name__)

T = TypeVar("T")


# -- errors and auth --------------------------------------------------------------------


async def _abort(context: grpc.aio.ServicerContext, e: FleetError) -> NoReturn:
    code = grpc_status(e)
    if code is grpc.StatusCode.INTERNAL:
        logger.warning("FleetService: %s", e, exc_info=e)
    else:
        logger.info("FleetService: %s: %s", code.name, e)
    await context.abort(code, e.message)
    raise AssertionError("context.abort returned")  # it raises; for the type checker


class _Mapped:
    """`async with _Mapped(context):` turns a FleetError into the matching gRPC status."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(e, FleetError):
            await _abort(self._context, e)


# -- the service ------------------------------------------------------------------------


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    def __init__(
        self,
        local: LocalClient,
        coordinator: Coordinator,
        *,
        advertise_broker: str,
        controller: RolloutController | None = None,
        watch_interval: float = 0.5,
    ) -> None:
        self.local = local
        self.coordinator = coordinator
        self.controller = controller
        self.watch_interval = watch_interval
        self.advertise_broker = advertise_broker

    # -- models

    async def ListModels(
        self, request: fleet_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListModelsResponse:
        async with _Mapped(context):
            models = await asyncio.to_thread(self.local.list_models)
            return fleet_pb2.ListModelsResponse(models=[summary_to_pb(m) for m in models])

    async def ListVersions(
        self, request: fleet_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListVersionsResponse:
        async with _Mapped(context):
            name = check_model_name(request.model)
            versions = await asyncio.to_thread(self.local.list_versions, name)
            return fleet_pb2.ListVersionsResponse(versions=[version_to_pb(v) for v in versions])

    async def GetVersion(
        self, request: fleet_pb2.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ModelVersionInfo:
        async with _Mapped(context):
            mv = await asyncio.to_thread(self.local.get_version, ModelRef.parse(request.ref))
            return version_to_pb(mv)

    async def Promote(
        self, request: fleet_pb2.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.PromoteResponse:
        async with _Mapped(context):
            stage = check_stage(request.stage or "production")
            mv, archived = await asyncio.to_thread(
                lambda: self.local.promote(
                    ModelRef.parse(request.ref), stage, archive_existing=not request.keep_existing
                )
            )
            logger.info(
                "promoted %s:%d to %s (archived %s)", mv.model, mv.version, stage, archived or "-"
            )
            return fleet_pb2.PromoteResponse(version=version_to_pb(mv), archived=archived)

    async def Verify(
        self, request: fleet_pb2.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.VerifyResponse:
        async with _Mapped(context):
            mv, results = await asyncio.to_thread(self.local.verify, ModelRef.parse(request.ref))
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
        def work(push: Callable[[fleet_pb2.Progress], None]) -> ModelVersion:
            def on_epoch(stat: Any) -> None:
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

            return self.local.train(
                check_model_name(request.model),
                request.data or "digits",
                arch=request.arch or "mlp",
                epochs=request.epochs or 20,
                seed=request.seed,
                batch_size=request.batch_size or 64,
                lr=request.lr or 3e-3,
                on_epoch=on_epoch,
            )

        async with _Mapped(context):
            async for p in _in_thread(work):
                yield p

    async def Quantize(
        self, request: fleet_pb2.QuantizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.Progress]:
        from edgefleet.cloud.variants import parse_variants

        def work(push: Callable[[fleet_pb2.Progress], None]) -> ModelVersion:
            def progress(what: str, done: int, total: int) -> None:
                push(fleet_pb2.Progress(step=what, done=done, total=total))

            return self.local.quantize(
                ModelRef.parse(request.ref),
                list(request.variants),
                max_drop=request.max_drop,
                force=request.force,
                progress=progress,
            )

        async with _Mapped(context):
            if not request.variants:
                raise InvalidArgument("quantize: no variants named; e.g. int8, fp16, tflite-int8")
            parse_variants(",".join(request.variants))
            async for p in _in_thread(work):
                yield p

    # -- devices

    async def ListDevices(
        self, request: fleet_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListDevicesResponse:
        async with _Mapped(context):
            selector = Selector.parse(request.selector) if request.selector else None
            where = dataclasses.replace(
                DeviceFilter.parse(group=request.group, version=request.version),
                connectivity=request.connectivity,
                stale_s=request.stale_s,
            )
            devices = await asyncio.to_thread(
                lambda: self.local.list_devices(
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
        async with _Mapped(context):
            d = await asyncio.to_thread(self.local.get_device, request.device_id)
            return device_to_pb(d)

    async def EnrollDevice(
        self, request: fleet_pb2.EnrollDeviceRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.EnrollmentBundle:
        async with _Mapped(context):
            b = await asyncio.to_thread(
                lambda: self.local.enroll_device(
                    request.device_id,
                    group=request.group,
                    tags=dict(request.tags),
                    broker_url=self.advertise_broker,
                )
            )
            logger.info("enrolled %s (group %r)", b.device_id, b.group)
            return bundle_to_pb(b)

    async def Status(
        self, request: fleet_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.StatusResponse:
        async with _Mapped(context):
            devices = await asyncio.to_thread(self.local.devices.find)
            by_state: dict[str, int] = {}
            for d in devices:
                by_state[d.state] = by_state.get(d.state, 0) + 1
            return fleet_pb2.StatusResponse(
                coordinator_version=coordinator_version(),
                broker_url=self.advertise_broker,
                devices=len(devices),
                online=sum(1 for d in devices if d.online),
                by_state=by_state,
                replicas=[replica_to_pb(r) for r in await asyncio.to_thread(self.local.replicas)],
            )

    # -- rollouts

    def _controller(self) -> RolloutController:
        if self.controller is None:
            raise Unavailable("this coordinator runs no rollout controller")
        return self.controller

    async def GetDrift(
        self, request: fleet_pb2.GetDriftRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.GetDriftResponse:
        from edgefleet.cloud.drift.convert import drift_to_pb

        async with _Mapped(context):
            rows = await asyncio.to_thread(
                lambda: self.local.drift(by=request.by or "group", model=request.model or None)
            )
            return fleet_pb2.GetDriftResponse(rows=[drift_to_pb(r) for r in rows])

    async def ListAlerts(
        self, request: fleet_pb2.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListAlertsResponse:
        from edgefleet.cloud.drift.convert import alert_to_pb

        async with _Mapped(context):
            found = await asyncio.to_thread(lambda: self.local.alerts(include_resolved=request.all))
            return fleet_pb2.ListAlertsResponse(alerts=[alert_to_pb(a) for a in found])

    async def ListRollouts(
        self, request: fleet_pb2.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListRolloutsResponse:
        async with _Mapped(context):
            found = await asyncio.to_thread(
                lambda: self.local.rollouts.find(active_only=request.active_only)
            )
            return fleet_pb2.ListRolloutsResponse(rollouts=[rollout_to_pb(r) for r in found])

    async def GetRollout(
        self, request: fleet_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RolloutInfo:
        async with _Mapped(context):
            r, devs = await asyncio.to_thread(self.local.get_rollout, request.rollout_id)
            return rollout_to_pb(r, devs)

    async def WatchRollout(
        self, request: fleet_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.RolloutInfo]:
        async with _Mapped(context):
            last: fleet_pb2.RolloutInfo | None = None
            while True:
                r = await asyncio.to_thread(self.local.rollouts.get, request.rollout_id)
                msg = rollout_to_pb(r)
                msg.ClearField("updated_ms")
                if last is None or msg != last:
                    last = msg
                    yield rollout_to_pb(r)
                if r.final:
                    return
                if self.controller is not None:
                    await self.controller.wait_changed(self.watch_interval * 4)
                else:
                    await asyncio.sleep(self.watch_interval)

    async def ControlRollout(
        self, request: fleet_pb2.ControlRolloutRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RolloutInfo:
        async with _Mapped(context):
            r = await self._controller().control(request.rollout_id, request.action)
            return rollout_to_pb(r)

    async def _staged(
        self, request: fleet_pb2.DeployRequest, ref: ModelRef, selector: Selector
    ) -> fleet_pb2.Progress:
        from edgefleet.cloud.rollouts.policy import Policy

        policy = (
            policy_from_pb(request.policy) if request.HasField("policy") else Policy.all_at_once()
        )
        r, devs = await self._controller().create(ref, selector, policy, dry_run=request.dry_run)
        return fleet_pb2.Progress(
            step="rollout",
            done=0,
            total=sum(s.devices for s in r.stages),
            rollout=rollout_to_pb(r, devs if request.dry_run else ()),
        )

    async def Deploy(
        self, request: fleet_pb2.DeployRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.Progress]:
        """Every deploy is a rollout the controller runs (a plain one: `Policy.all_at_once`),
        stored, listed and watchable; this answers once it is created (WatchRollout follows)."""
        async with _Mapped(context):
            ref = ModelRef.parse(request.ref)
            selector = Selector.parse(request.selector or "all")
            yield await self._staged(request, ref, selector)


async def _in_thread(
    work: Callable[[Callable[[fleet_pb2.Progress], None]], ModelVersion],
) -> AsyncIterator[fleet_pb2.Progress]:
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
