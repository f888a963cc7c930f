"""FleetService (protos/fleet/v1/fleet.proto) on grpc.aio, in the coordinator's event loop.

Every call must carry an API token as metadata `authorization: Bearer <token>`;
`cloud.access.interceptor.AccessInterceptor` checks it and the caller's role, and
records state-changing calls in the audit log. Registry and device-store calls go
to worker threads; `Deploy` drives the `Coordinator` and streams one `Progress`
per device reaching a final state, then a `DeployResult`. FleetErrors become gRPC
status codes (`protos.grpc_errors`) and come back as the same class in `cloud.remote`.

The conversions between registry/device values and `fleet_pb2` messages live here,
in both directions, so the client and the server agree on them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from edgefleet.cloud.client import DeviceOutcome, EnrollmentBundle, LocalClient, coordinator_version
from edgefleet.cloud.coordinator import FINAL_STATES
from edgefleet.cloud.devices import Device, DeviceFilter, Selector
from edgefleet.cloud.registry import ModelRef, ModelSummary, ModelVersion
from edgefleet.cloud.registry.entities import Lineage, Variant, check_model_name, check_stage
from edgefleet.protos.errors import (
    FleetError,
    InvalidArgument,
    Unavailable,
)
from edgefleet.protos.fleet.v1 import device_pb2, fleet_pb2, fleet_pb2_grpc, model_pb2
from edgefleet.protos.grpc_errors import grpc_status
from edgefleet.protos.manifest import DTYPES, RUNTIMES, TensorSpec

if TYPE_CHECKING:
    from edgefleet.cloud.coordinator import Coordinator
    from edgefleet.cloud.rollouts.controller import RolloutController

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_DEPLOY_TIMEOUT = 300.0
#: the client's deadline is the deploy timeout plus this; the server waits for devices
#: until the deadline minus this, so the final DeployResult always gets through
DEPLOY_DEADLINE_MARGIN = 5.0

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_RUNTIME_NAMES = {v: k for k, v in RUNTIMES.items()}


# -- conversions ------------------------------------------------------------------------


def _ms(dt: datetime | None) -> int:
    return int(dt.timestamp() * 1000) if dt is not None else 0


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def spec_to_pb(t: TensorSpec) -> model_pb2.TensorSpec:
    return model_pb2.TensorSpec(name=t.name, dtype=DTYPES[t.dtype], shape=list(t.shape))  # type: ignore[arg-type]


def spec_from_pb(t: model_pb2.TensorSpec) -> TensorSpec:
    return TensorSpec(t.name, _DTYPE_NAMES.get(t.dtype, "float32"), tuple(t.shape))


def version_to_pb(mv: ModelVersion) -> fleet_pb2.ModelVersionInfo:
    lin = mv.lineage
    info = fleet_pb2.ModelVersionInfo(
        model=mv.model,
        version=mv.version,
        stage=mv.stage,
        arch=mv.arch,
        inputs=[spec_to_pb(t) for t in mv.inputs],
        outputs=[spec_to_pb(t) for t in mv.outputs],
        classes=list(mv.classes),
        metrics={k: float(v) for k, v in mv.metrics.items()},
        lineage=fleet_pb2.Lineage(
            source=lin.source,
            parent_version=lin.parent_version or 0,
            dataset_name=lin.dataset_name,
            dataset_digest=lin.dataset_digest,
            training_config_json=_json(dict(lin.training_config)),
            code_version=lin.code_version,
            federated_json=_json(dict(lin.federated)) if lin.federated is not None else "",
            origin_json=_json(dict(lin.origin)),
        ),
        checkpoint_sha256=mv.checkpoint_sha256 or "",
        created_at_ms=_ms(mv.created_at),
    )
    for v in mv.variants:
        vi = info.variants.add(
            name=v.name,
            runtime=RUNTIMES.get(v.runtime, model_pb2.RUNTIME_UNSPECIFIED),
            sha256=v.sha256,
            size=v.size,
            latency_ms={k: float(x) for k, x in v.latency_ms.items()},
            quantization_json=_json(dict(v.quantization)),
            deployable=v.deployable,
            reason=v.reason,
            signed_manifest=v.signed_manifest,
        )
        if v.accuracy is not None:
            vi.accuracy = v.accuracy
    return info


def version_from_pb(m: fleet_pb2.ModelVersionInfo) -> ModelVersion:
    lin = m.lineage
    created = _dt(m.created_at_ms)
    return ModelVersion(
        arch=m.arch,
        inputs=tuple(spec_from_pb(t) for t in m.inputs),
        outputs=tuple(spec_from_pb(t) for t in m.outputs),
        classes=tuple(m.classes),
        metrics=dict(m.metrics),
        lineage=Lineage(
            source=lin.source,
            parent_version=lin.parent_version or None,
            dataset_name=lin.dataset_name,
            dataset_digest=lin.dataset_digest,
            training_config=json.loads(lin.training_config_json or "{}"),
            code_version=lin.code_version,
            federated=json.loads(lin.federated_json) if lin.federated_json else None,
            origin=json.loads(lin.origin_json or "{}"),
        ),
        checkpoint_sha256=m.checkpoint_sha256 or None,
        evalset_sha256=None,  # not part of the contract: stays on the coordinator
        model=m.model,
        version=m.version,
        stage=m.stage,
        created_at=created,
        variants=tuple(
            Variant(
                name=v.name,
                runtime=_RUNTIME_NAMES.get(v.runtime, "unknown"),
                sha256=v.sha256,
                size=v.size,
                accuracy=v.accuracy if v.HasField("accuracy") else None,
                latency_ms=dict(v.latency_ms),
                quantization=json.loads(v.quantization_json or "{}"),
                deployable=v.deployable,
                reason=v.reason,
                signed_manifest=v.signed_manifest,
                created_at=created,
            )
            for v in m.variants
        ),
    )


def summary_to_pb(s: ModelSummary) -> fleet_pb2.ModelSummary:
    return fleet_pb2.ModelSummary(
        name=s.name,
        versions=s.versions,
        latest_version=s.latest_version or 0,
        production_version=s.production_version or 0,
        created_at_ms=_ms(s.created_at),
    )


def summary_from_pb(m: fleet_pb2.ModelSummary) -> ModelSummary:
    return ModelSummary(
        name=m.name,
        created_at=_dt(m.created_at_ms),
        versions=m.versions,
        latest_version=m.latest_version or None,
        production_version=m.production_version or None,
    )


def _parse_into(d: Mapping[str, Any], msg: T, what: str) -> T | None:
    try:
        ParseDict(dict(d), msg, ignore_unknown_fields=True)  # type: ignore[type-var]
    except ParseError as e:
        logger.warning("%s not representable: %s", what, e)
        return None
    return msg


def _to_dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, use_integers_for_enums=False)


def device_to_pb(d: Device) -> fleet_pb2.DeviceInfo:
    info = fleet_pb2.DeviceInfo(
        device_id=d.device_id,
        group=d.group,
        tags=dict(d.tags),
        online=d.online,
        last_seen_ms=_ms(d.last_seen),
        desired_generation=d.desired_generation,
    )
    if d.capabilities:
        caps = _parse_into(d.capabilities, device_pb2.Capabilities(), f"{d.device_id} capabilities")
        if caps is not None:
            info.capabilities.CopyFrom(caps)
    if d.active:
        act = _parse_into(d.active, device_pb2.ModelRef(), f"{d.device_id} active model")
        if act is not None:
            info.active.CopyFrom(act)
    if d.reported:
        rep = dict(d.reported)
        rep["state"] = "UPDATE_STATE_" + str(rep.get("state", "unspecified")).upper()
        rep["reason"] = "REASON_CODE_" + str(rep.get("reason", "unspecified")).upper()
        parsed = _parse_into(rep, device_pb2.ReportedState(), f"{d.device_id} reported state")
        if parsed is not None:
            info.reported.CopyFrom(parsed)
    return info


def device_from_pb(m: fleet_pb2.DeviceInfo) -> Device:
    from edgefleet.cloud.serde import decode_reported

    return Device(
        device_id=m.device_id,
        group=m.group,
        tags=dict(m.tags),
        enrolled_at=_dt(0),  # not part of the contract
        online=m.online,
        last_seen=_dt(m.last_seen_ms) if m.last_seen_ms else None,
        agent_version="",
        capabilities=_to_dict(m.capabilities) if m.HasField("capabilities") else {},
        active=_to_dict(m.active) if m.HasField("active") else {},
        reported=(
            decode_reported(m.reported.SerializeToString()) if m.HasField("reported") else {}
        ),
        desired_generation=m.desired_generation,
        rollout_id="",
    )


def bundle_to_pb(b: EnrollmentBundle) -> fleet_pb2.EnrollmentBundle:
    return fleet_pb2.EnrollmentBundle(
        device_id=b.device_id,
        broker_url=b.broker_url,
        username=b.username or "",
        password=b.password or "",
        signing_public_key=b.signing_public_key.encode(),
        ca_certificate=(b.ca_certificate or "").encode(),
        topic_prefix=b.topic_prefix,
        group=b.group,
        tags=dict(b.tags),
    )


def bundle_from_pb(m: fleet_pb2.EnrollmentBundle) -> EnrollmentBundle:
    return EnrollmentBundle(
        device_id=m.device_id,
        broker_url=m.broker_url,
        signing_public_key=m.signing_public_key.decode(),
        topic_prefix=m.topic_prefix,
        group=m.group,
        tags=dict(m.tags),
        username=m.username or None,
        password=m.password or None,
        ca_certificate=m.ca_certificate.decode() or None,
    )


def outcome_to_fields(o: DeviceOutcome) -> dict[str, str]:
    return {
        "device": o.device_id,
        "variant": o.variant,
        "state": o.state,
        "reason": o.reason,
        "detail": o.detail,
    }


def outcome_from_fields(f: Mapping[str, str]) -> DeviceOutcome:
    return DeviceOutcome(
        device_id=f.get("device", ""),
        variant=f.get("variant", ""),
        state=f.get("state", ""),
        reason=f.get("reason", ""),
        detail=f.get("detail", ""),
    )


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
        default_timeout: float = DEFAULT_DEPLOY_TIMEOUT,
        watch_interval: float = 0.5,
    ) -> None:
        self.local = local
        self.coordinator = coordinator
        self.controller = controller
        self.watch_interval = watch_interval
        self.advertise_broker = advertise_broker
        self.default_timeout = default_timeout

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
            d = await asyncio.to_thread(
                lambda: self.local.devices.enroll(
                    request.device_id, group=request.group, tags=dict(request.tags)
                )
            )
            logger.info("enrolled %s (group %r)", d.device_id, d.group)
            return bundle_to_pb(self.local.bundle(d, broker_url=self.advertise_broker))

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
        from edgefleet.cloud.rollouts.convert import rollout_to_pb

        async with _Mapped(context):
            found = await asyncio.to_thread(
                lambda: self.local.rollouts.find(active_only=request.active_only)
            )
            return fleet_pb2.ListRolloutsResponse(rollouts=[rollout_to_pb(r) for r in found])

    async def GetRollout(
        self, request: fleet_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RolloutInfo:
        from edgefleet.cloud.rollouts.convert import rollout_to_pb

        async with _Mapped(context):
            r, devs = await asyncio.to_thread(self.local.get_rollout, request.rollout_id)
            return rollout_to_pb(r, devs)

    async def WatchRollout(
        self, request: fleet_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.RolloutInfo]:
        from edgefleet.cloud.rollouts.convert import rollout_to_pb

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
        from edgefleet.cloud.rollouts.convert import rollout_to_pb

        async with _Mapped(context):
            r = await self._controller().control(request.rollout_id, request.action)
            return rollout_to_pb(r)

    async def _staged(
        self, request: fleet_pb2.DeployRequest, ref: ModelRef, selector: Selector
    ) -> fleet_pb2.Progress:
        from edgefleet.cloud.rollouts.convert import policy_from_pb, rollout_to_pb
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
        async with _Mapped(context):
            ref = ModelRef.parse(request.ref)
            selector = Selector.parse(request.selector or "all")
            if request.HasField("policy") or request.dry_run:
                yield await self._staged(request, ref, selector)
                return
            if self.controller is not None:  # not under a rollout's feet
                found = await asyncio.to_thread(self.local.devices.find, selector)
                await self.controller.check_free([d.device_id for d in found])
            remaining = context.time_remaining()
            timeout = (
                self.default_timeout
                if remaining is None
                else max(1.0, remaining - DEPLOY_DEADLINE_MARGIN)
            )
            coord = self.coordinator
            outcome = await coord.deploy(ref, selector)
            shas = {t.sha256 for t in outcome.targets}
            sent_before = sum(coord.broadcaster.stats(s).bytes_sent for s in shas)
            total = len(outcome.targets) + len(outcome.skipped)
            yield fleet_pb2.Progress(
                step="deploy",
                done=0,
                total=total,
                fields={"rollout_id": outcome.rollout_id, "ref": outcome.ref},
            )
            results: dict[str, DeviceOutcome] = {}

            def progress(o: DeviceOutcome) -> fleet_pb2.Progress:
                results[o.device_id] = o
                return fleet_pb2.Progress(
                    step="device", done=len(results), total=total, fields=outcome_to_fields(o)
                )

            for dev, why in outcome.skipped.items():
                yield progress(DeviceOutcome(dev, "", "skipped", "no_variant", why))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            devs: dict[str, Device] = {}
            while len(results) < total and loop.time() < deadline:
                devs = await coord.wait_settled(
                    outcome, timeout=min(0.5, max(0.0, deadline - loop.time()))
                )
                for t in outcome.targets:
                    d = devs.get(t.device_id)
                    if (
                        t.device_id in results
                        or d is None
                        or int(d.reported.get("generation", 0)) < t.generation
                        or d.state not in FINAL_STATES
                    ):
                        continue
                    yield progress(
                        DeviceOutcome(
                            t.device_id,
                            t.variant,
                            d.state,
                            str(d.reported.get("reason", "")),
                            str(d.reported.get("detail", "")),
                        )
                    )
            for t in outcome.targets:
                if t.device_id not in results:
                    d = devs.get(t.device_id)
                    last = d.state if d is not None else "unknown"
                    yield progress(
                        DeviceOutcome(
                            t.device_id,
                            t.variant,
                            "timeout",
                            last,
                            f"no final state within {timeout:.0f}s (last reported: {last})",
                        )
                    )
            active = sum(1 for o in results.values() if o.ok)
            sent = sum(coord.broadcaster.stats(s).bytes_sent for s in shas) - sent_before
            logger.info(
                "rollout %s: %s active %d of %d", outcome.rollout_id, outcome.ref, active, total
            )
            yield fleet_pb2.Progress(
                step="done",
                done=total,
                total=total,
                deploy=fleet_pb2.DeployResult(
                    rollout_id=outcome.rollout_id,
                    targeted=total,
                    active=active,
                    failed=total - active,
                    bytes_sent=max(0, sent),
                ),
            )


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
