"""Every conversion between the coordinator's values and the gRPC messages (fleet.v1
FleetService and FederatedService), both directions, in one place: the server
(`cloud.api.service`, `cloud.fl.service`) and the clients (`cloud.remote`,
`cloud.fl.remote`) import them from here, and tests/unit/test_convert.py round-trips
each one. Times travel as integer milliseconds since the epoch, 0 for "none".
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from edgefleet.cloud.devices import Device, Selector
from edgefleet.cloud.devices.values import (
    Accelerator,
    Capabilities,
    ReasonCode,
    Reported,
    ServedModel,
    UpdateState,
)
from edgefleet.cloud.fl.federation import FlEnrollment, RunRequest
from edgefleet.cloud.fl.store import FlRun
from edgefleet.cloud.registry import ModelRef, ModelSummary, ModelVersion
from edgefleet.cloud.registry.entities import Lineage, Variant
from edgefleet.cloud.replicas.registry import ReplicaInfo
from edgefleet.cloud.rollouts.model import (
    DevicePhase,
    GateResult,
    Rollout,
    RolloutDevice,
    RolloutState,
    Stage,
    StageState,
)
from edgefleet.cloud.rollouts.policy import Policy
from edgefleet.cloud.services.values import EnrollmentBundle
from edgefleet.cloud.variants import DEFAULT_VARIANTS
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.fleet.v1 import device_pb2, federated_pb2, fleet_pb2, model_pb2
from edgefleet.protos.manifest import DTYPES, RUNTIMES, TensorSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_RUNTIME_NAMES = {v: k for k, v in RUNTIMES.items()}
_OPTIONAL = ("max_latency_regression", "max_memory_mb", "min_agreement", "min_accuracy")


# -- time -------------------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def _ms(dt: datetime | None) -> int:
    """A datetime as epoch milliseconds (None: 0), exactly: no float on the way (a naive
    datetime is local time, as `datetime.timestamp` reads it)."""
    if dt is None:
        return 0
    aware = dt.astimezone() if dt.tzinfo is None else dt
    return (aware - _EPOCH) // _ONE_MS


def _dt(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return _EPOCH + ms * _ONE_MS


def _ms_s(ts: float) -> int:
    """Epoch seconds (rollout values; 0.0 for "none") as milliseconds, to the nearest."""
    return round(ts * 1000) if ts else 0


def _s_ms(ms: int) -> float:
    return ms / 1000 if ms else 0.0


# -- registry and devices ---------------------------------------------------------------


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


# -- device values (MQTT and gRPC) -------------------------------------------------------

_pb = device_pb2
_UPDATE_STATES: Mapping[UpdateState, int] = {
    UpdateState.UNSPECIFIED: _pb.UPDATE_STATE_UNSPECIFIED,
    UpdateState.IDLE: _pb.UPDATE_STATE_IDLE,
    UpdateState.DOWNLOADING: _pb.UPDATE_STATE_DOWNLOADING,
    UpdateState.VERIFYING: _pb.UPDATE_STATE_VERIFYING,
    UpdateState.LOADING: _pb.UPDATE_STATE_LOADING,
    UpdateState.SELF_TEST: _pb.UPDATE_STATE_SELF_TEST,
    UpdateState.ACTIVE: _pb.UPDATE_STATE_ACTIVE,
    UpdateState.FAILED: _pb.UPDATE_STATE_FAILED,
    UpdateState.ROLLED_BACK: _pb.UPDATE_STATE_ROLLED_BACK,
    UpdateState.SHADOWING: _pb.UPDATE_STATE_SHADOWING,
}
_REASONS: Mapping[ReasonCode, int] = {
    ReasonCode.UNSPECIFIED: _pb.REASON_CODE_UNSPECIFIED,
    ReasonCode.OK: _pb.REASON_CODE_OK,
    ReasonCode.BAD_SIGNATURE: _pb.REASON_CODE_BAD_SIGNATURE,
    ReasonCode.CHUNK_DIGEST_MISMATCH: _pb.REASON_CODE_CHUNK_DIGEST_MISMATCH,
    ReasonCode.ARTIFACT_DIGEST_MISMATCH: _pb.REASON_CODE_ARTIFACT_DIGEST_MISMATCH,
    ReasonCode.TRUNCATED: _pb.REASON_CODE_TRUNCATED,
    ReasonCode.MALFORMED_MESSAGE: _pb.REASON_CODE_MALFORMED_MESSAGE,
    ReasonCode.UNKNOWN_VARIANT: _pb.REASON_CODE_UNKNOWN_VARIANT,
    ReasonCode.UNSUPPORTED_RUNTIME: _pb.REASON_CODE_UNSUPPORTED_RUNTIME,
    ReasonCode.LOAD_FAILED: _pb.REASON_CODE_LOAD_FAILED,
    ReasonCode.SELF_TEST_FAILED: _pb.REASON_CODE_SELF_TEST_FAILED,
    ReasonCode.DISK_FULL: _pb.REASON_CODE_DISK_FULL,
    ReasonCode.STALE_GENERATION: _pb.REASON_CODE_STALE_GENERATION,
    ReasonCode.NO_LAST_KNOWN_GOOD: _pb.REASON_CODE_NO_LAST_KNOWN_GOOD,
    ReasonCode.EXPIRED: _pb.REASON_CODE_EXPIRED,
    ReasonCode.KEY_REVOKED: _pb.REASON_CODE_KEY_REVOKED,
    ReasonCode.UNTRUSTED_KEY: _pb.REASON_CODE_UNTRUSTED_KEY,
    ReasonCode.OFFLINE_INSTALL: _pb.REASON_CODE_OFFLINE_INSTALL,
    ReasonCode.DELTA_NO_BASE: _pb.REASON_CODE_DELTA_NO_BASE,
    ReasonCode.DELTA_FAILED: _pb.REASON_CODE_DELTA_FAILED,
    ReasonCode.AGENT_INSTALL_FAILED: _pb.REASON_CODE_AGENT_INSTALL_FAILED,
    ReasonCode.AGENT_CHECK_FAILED: _pb.REASON_CODE_AGENT_CHECK_FAILED,
    ReasonCode.AGENT_UNHEALTHY: _pb.REASON_CODE_AGENT_UNHEALTHY,
    ReasonCode.AGENT_PLATFORM: _pb.REASON_CODE_AGENT_PLATFORM,
}
E = TypeVar("E", bound=StrEnum)


def _enum_of(table: Mapping[E, int], what: str) -> Callable[[int], E]:
    """The reverse of `table`: protobuf number -> value, InvalidArgument for a number
    this release does not know."""
    by_number = {n: value for value, n in table.items()}
    accepted = f"0..{max(by_number)}"

    def of(n: int) -> E:
        try:
            return by_number[n]
        except KeyError:
            raise InvalidArgument(f"{what} {n} unknown; accepted: {accepted}") from None

    return of


update_state_from_pb = _enum_of(_UPDATE_STATES, "update state")
reason_from_pb = _enum_of(_REASONS, "reason code")


def update_state_to_pb(s: UpdateState) -> device_pb2.UpdateState.ValueType:
    return device_pb2.UpdateState.ValueType(_UPDATE_STATES[s])


def reason_to_pb(r: ReasonCode) -> device_pb2.ReasonCode.ValueType:
    return device_pb2.ReasonCode.ValueType(_REASONS[r])


def served_to_pb(m: ServedModel) -> device_pb2.ModelRef:
    return device_pb2.ModelRef(model=m.model, version=m.version, variant=m.variant, sha256=m.sha256)


def served_from_pb(m: device_pb2.ModelRef) -> ServedModel | None:
    return ServedModel(m.model, m.version, m.variant, m.sha256) if m.model else None


def capabilities_to_pb(c: Capabilities) -> device_pb2.Capabilities:
    return device_pb2.Capabilities(
        machine=c.machine,
        runtimes=list(c.runtimes),
        providers=list(c.providers),
        accelerator=str(c.accelerator),
        memory_mb=c.memory_mb,
        tflite_runtime_legacy=c.tflite_runtime_legacy,
        features=list(c.features),
    )


def capabilities_from_pb(m: device_pb2.Capabilities) -> Capabilities:
    """InvalidArgument for an accelerator class this release does not know."""
    accel = m.accelerator or Accelerator.CPU
    if accel not in set(Accelerator):
        raise InvalidArgument(
            f"accelerator {accel[:40]!r} unknown; accepted: {', '.join(Accelerator)}"
        )
    return Capabilities(
        machine=m.machine,
        runtimes=tuple(m.runtimes),
        providers=tuple(m.providers),
        accelerator=Accelerator(accel),
        memory_mb=m.memory_mb,
        tflite_runtime_legacy=m.tflite_runtime_legacy,
        features=tuple(m.features),
    )


def reported_to_pb(r: Reported) -> device_pb2.ReportedState:
    msg = device_pb2.ReportedState(
        device_id=r.device_id,
        generation=r.generation,
        state=update_state_to_pb(r.state),
        reason=reason_to_pb(r.reason),
        detail=r.detail,
        chunks_have=r.chunks_have,
        chunks_total=r.chunks_total,
        provider=r.provider,
        timestamp_ms=r.timestamp_ms,
    )
    if r.active is not None:
        msg.active.CopyFrom(served_to_pb(r.active))
    if r.last_known_good is not None:
        msg.last_known_good.CopyFrom(served_to_pb(r.last_known_good))
    return msg


def reported_from_pb(m: device_pb2.ReportedState) -> Reported:
    """The coordinator's own copy of a device's report (checked when it arrived);
    InvalidArgument for an enum number this release does not know."""
    return Reported(
        device_id=m.device_id,
        generation=m.generation,
        state=update_state_from_pb(m.state),
        reason=reason_from_pb(m.reason),
        detail=m.detail,
        active=served_from_pb(m.active),
        last_known_good=served_from_pb(m.last_known_good),
        chunks_have=m.chunks_have,
        chunks_total=m.chunks_total,
        provider=m.provider,
        timestamp_ms=m.timestamp_ms,
    )


def device_to_pb(d: Device) -> fleet_pb2.DeviceInfo:
    info = fleet_pb2.DeviceInfo(
        device_id=d.device_id,
        group=d.group,
        tags=dict(d.tags),
        online=d.online,
        last_seen_ms=_ms(d.last_seen),
        desired_generation=d.desired_generation,
        agent_version=d.agent_version,
    )
    if d.capabilities is not None:
        info.capabilities.CopyFrom(capabilities_to_pb(d.capabilities))
    if d.active is not None:
        info.active.CopyFrom(served_to_pb(d.active))
    if d.reported is not None:
        info.reported.CopyFrom(reported_to_pb(d.reported))
    return info


def device_from_pb(m: fleet_pb2.DeviceInfo) -> Device:
    return Device(
        device_id=m.device_id,
        group=m.group,
        tags=dict(m.tags),
        enrolled_at=_dt(0),  # not part of the contract
        online=m.online,
        last_seen=_dt(m.last_seen_ms) if m.last_seen_ms else None,
        agent_version=m.agent_version,
        capabilities=capabilities_from_pb(m.capabilities) if m.HasField("capabilities") else None,
        active=served_from_pb(m.active),
        reported=reported_from_pb(m.reported) if m.HasField("reported") else None,
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
        root_public_key=b.root_public_key.encode(),
        key_list=base64.b64decode(b.key_list),
        ca_certificate=(b.ca_certificate or "").encode(),
        client_certificate=(b.client_certificate or "").encode(),
        client_key=(b.client_key or "").encode(),
        topic_prefix=b.topic_prefix,
        group=b.group,
        tags=dict(b.tags),
    )


def bundle_from_pb(m: fleet_pb2.EnrollmentBundle) -> EnrollmentBundle:
    return EnrollmentBundle(
        device_id=m.device_id,
        broker_url=m.broker_url,
        signing_public_key=m.signing_public_key.decode(),
        root_public_key=m.root_public_key.decode(),
        key_list=base64.b64encode(m.key_list).decode(),
        topic_prefix=m.topic_prefix,
        group=m.group,
        tags=dict(m.tags),
        username=m.username or None,
        password=m.password or None,
        ca_certificate=m.ca_certificate.decode() or None,
        client_certificate=m.client_certificate.decode() or None,
        client_key=m.client_key.decode() or None,
    )


# -- rollouts -----------------------------------------------------------------------


def policy_to_pb(p: Policy) -> fleet_pb2.RolloutPolicy:
    msg = fleet_pb2.RolloutPolicy(
        canary=p.canary,
        waves=list(p.waves),
        bake_s=p.bake_s,
        max_failure_rate=p.max_failure_rate,
        on_failure=p.on_failure,
        min_samples=p.min_samples,
        stage_timeout_s=p.stage_timeout_s,
        sample_rate=p.sample_rate,
    )
    for name in _OPTIONAL:
        value = getattr(p, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def policy_from_pb(m: fleet_pb2.RolloutPolicy) -> Policy:
    """Validated like the CLI's flags (InvalidArgument names the field)."""
    kw: dict[str, Any] = {
        "canary": m.canary,
        "waves": tuple(m.waves),
        "bake_s": m.bake_s,
        "max_failure_rate": m.max_failure_rate,
        "on_failure": m.on_failure or "rollback",
        "min_samples": m.min_samples or 20,
        "stage_timeout_s": m.stage_timeout_s or 300.0,
        "sample_rate": m.sample_rate or 1.0,
    }
    for name in _OPTIONAL:
        if m.HasField(name):  # type: ignore[arg-type]
            kw[name] = getattr(m, name)
    return Policy(**kw)


def _gate_to_pb(x: GateResult) -> fleet_pb2.GateResult:
    return fleet_pb2.GateResult(
        name=x.name, ok=x.ok, value=x.value, threshold=x.threshold, detail=x.detail
    )


def _stage_to_pb(s: Stage, eta: float) -> fleet_pb2.StageInfo:
    return fleet_pb2.StageInfo(
        name=s.name,
        fraction=s.fraction,
        devices=s.devices,
        state=s.state,
        by_state=dict(s.by_state),
        started_ms=_ms_s(s.started_at),
        bake_started_ms=_ms_s(s.bake_started_at),
        finished_ms=_ms_s(s.finished_at),
        eta_ms=_ms_s(eta),
        gates=[_gate_to_pb(x) for x in s.gates],
        samples=s.samples,
    )


def _device_to_pb(d: RolloutDevice, now: float) -> fleet_pb2.RolloutDeviceInfo:
    msg = fleet_pb2.RolloutDeviceInfo(
        device_id=d.device_id,
        stage=d.stage,
        variant=d.variant,
        phase=d.phase,
        state=d.state or "",
        reason=d.reason,
        detail=d.detail,
        generation=d.generation,
        last_seen_ms=_ms_s(d.last_seen),
        staleness_s=d.staleness(now) if d.last_seen else -1.0,
        shadow=dict(d.shadow),
    )
    if d.previous is not None:
        msg.previous.CopyFrom(served_to_pb(d.previous))
    return msg


def rollout_to_pb(
    r: Rollout, devices: Sequence[RolloutDevice] = (), *, now: float | None = None
) -> fleet_pb2.RolloutInfo:
    now = time.time() if now is None else now
    etas = r.etas(now)
    return fleet_pb2.RolloutInfo(
        rollout_id=r.rollout_id,
        ref=r.ref,
        selector=r.selector,
        policy=policy_to_pb(r.policy),
        state=r.state,
        reason=r.reason,
        stage=r.stage,
        stages=[_stage_to_pb(s, eta) for s, eta in zip(r.stages, etas, strict=True)],
        devices=[_device_to_pb(d, now) for d in devices],
        created_ms=_ms_s(r.created_at),
        updated_ms=_ms_s(r.updated_at),
        finished_ms=_ms_s(r.finished_at),
        skipped=len(r.skipped),
        dry_run=r.dry_run,
        skipped_devices=dict(r.skipped),
    )


def rollout_from_pb(m: fleet_pb2.RolloutInfo) -> tuple[Rollout, list[RolloutDevice]]:
    r = Rollout(
        rollout_id=m.rollout_id,
        ref=m.ref,
        model=m.ref.split(":")[0],
        version=int(m.ref.split(":")[1]) if ":" in m.ref else 0,
        selector=m.selector,
        policy=policy_from_pb(m.policy),
        state=RolloutState(m.state),
        stages=tuple(
            Stage(
                name=s.name,
                fraction=s.fraction,
                devices=s.devices,
                state=StageState(s.state),
                started_at=_s_ms(s.started_ms),
                bake_started_at=_s_ms(s.bake_started_ms),
                finished_at=_s_ms(s.finished_ms),
                gates=tuple(
                    GateResult(x.name, x.ok, x.value, x.threshold, x.detail) for x in s.gates
                ),
                samples=s.samples,
                by_state=dict(s.by_state),
            )
            for s in m.stages
        ),
        stage=m.stage,
        reason=m.reason,
        created_at=_s_ms(m.created_ms),
        updated_at=_s_ms(m.updated_ms),
        finished_at=_s_ms(m.finished_ms),
        skipped=dict(m.skipped_devices),
        dry_run=m.dry_run,
    )
    devices = [
        RolloutDevice(
            rollout_id=m.rollout_id,
            device_id=d.device_id,
            stage=d.stage,
            variant=d.variant,
            sha256="",
            previous=served_from_pb(d.previous),
            phase=DevicePhase(d.phase),
            generation=d.generation,
            state=UpdateState(d.state) if d.state else None,
            reason=d.reason,
            detail=d.detail,
            last_seen=_s_ms(d.last_seen_ms),
            shadow=dict(d.shadow),
        )
        for d in m.devices
    ]
    return r, devices


# -- federated learning -------------------------------------------------------------


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
        created_at=_dt(m.created_at_ms) if m.created_at_ms else datetime.now(UTC),
        finished_at=_dt(m.finished_at_ms) if m.finished_at_ms else None,
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
        evaluate=req.evaluate,
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
        evaluate=m.evaluate or d.evaluate,
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


# -- replicas (StatusResponse.replicas)


def replica_to_pb(r: ReplicaInfo) -> fleet_pb2.ReplicaStatus:
    return fleet_pb2.ReplicaStatus(
        replica_id=r.replica_id,
        address=r.address,
        host=r.host,
        pid=r.pid,
        heartbeat_age_s=r.heartbeat_age_s,
        leader=r.leader,
        token=r.token,
    )


def replica_from_pb(m: fleet_pb2.ReplicaStatus) -> ReplicaInfo:
    return ReplicaInfo(
        replica_id=m.replica_id,
        address=m.address,
        host=m.host,
        pid=m.pid,
        heartbeat_age_s=m.heartbeat_age_s,
        leader=m.leader,
        token=m.token,
    )
