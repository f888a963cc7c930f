"""GrpcClient: the FleetClient protocol over FleetService, for a running `fleet serve`.

Synchronous (the CLI is), one channel per client. Every call carries
`authorization: Bearer <token>`. Streams are read to their end even after the
result arrived, so a call ends with the server's status (and its audit entry is
written) rather than with this client hanging up. A gRPC status comes back as the FleetError it
was raised as on the coordinator, so the CLI prints the same one-line errors
as in local mode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from edgefleet.cloud.api.convert import (
    bundle_from_pb,
    device_from_pb,
    policy_to_pb,
    replica_from_pb,
    rollout_from_pb,
    summary_from_pb,
    version_from_pb,
)
from edgefleet.cloud.registry import ModelRef, ModelSummary, ModelVersion
from edgefleet.cloud.services.api import QuantizeProgress
from edgefleet.cloud.services.values import (
    BatchCutOff,
    EnrolledBatch,
    EnrollmentBundle,
    EpochProgress,
    EpochStat,
    FleetStatus,
)
from edgefleet.protos.errors import FleetError, InvalidArgument, Unavailable
from edgefleet.protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc
from edgefleet.protos.grpc_errors import error_from_status

if TYPE_CHECKING:
    from edgefleet.cloud.devices import Device, DeviceFilter, DeviceSpec, Selector
    from edgefleet.cloud.drift import Alert, DriftRow
    from edgefleet.cloud.pipeline import VerifyResult
    from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT = 60.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class GrpcClient:
    def __init__(
        self,
        address: str,
        token: str,
        *,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        """`tls`: verify the coordinator's certificate against `root_certificates`
        (PEM; None: the system's roots)."""
        self.address = address
        self.timeout = timeout
        self.tls = tls
        self._metadata = (("authorization", f"Bearer {token}"),)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = fleet_pb2_grpc.FleetServiceStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        """The channel, for other services' stubs on the same coordinator."""
        return self._channel

    def call(
        self, method: Callable[..., T], request: Message, *, timeout: float | None = None
    ) -> T:
        """A unary call with this client's token, deadline and error mapping."""
        try:
            return method(request, metadata=self._metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            self._fail(e)

    def stream(
        self, method: Callable[..., Iterable[T]], request: Message, *, timeout: float | None = None
    ) -> Iterator[T]:
        """A server-streaming call with this client's token and error mapping (no deadline
        unless given), read to its end."""
        try:
            yield from method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            self._fail(e)

    # -- plumbing

    def _fail(self, e: grpc.RpcError) -> NoReturn:
        code = e.code()
        details = e.details() or ""
        low = details.lower()
        if code == grpc.StatusCode.UNAVAILABLE and (
            "ssl" in low or "handshake" in low or "certificate" in low
        ):
            raise Unavailable(
                f"coordinator at {self.address}: TLS handshake failed ({details.splitlines()[0]}); "
                "check --ca / FLEET_CA names the CA that signed its certificate"
            ) from None
        if code == grpc.StatusCode.UNAVAILABLE and (
            "failed to connect" in low or "connection refused" in low
        ):
            raise Unavailable(
                f"coordinator at {self.address} is unreachable ({details.splitlines()[0]}): "
                "is 'fleet serve' running there?"
            ) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise Unavailable(f"coordinator at {self.address} did not answer in time") from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise FleetError(f"coordinator at {self.address} does not implement this: {details}")
        raise error_from_status(code, details) from None

    # -- models

    def list_models(self) -> list[ModelSummary]:
        resp = self.call(self._stub.ListModels, fleet_pb2.ListModelsRequest())
        return [summary_from_pb(m) for m in resp.models]

    def list_versions(self, model: str) -> list[ModelVersion]:
        resp = self.call(self._stub.ListVersions, fleet_pb2.ListVersionsRequest(model=model))
        return [version_from_pb(v) for v in resp.versions]

    def get_version(self, ref: ModelRef) -> ModelVersion:
        return version_from_pb(
            self.call(self._stub.GetVersion, fleet_pb2.GetVersionRequest(ref=str(ref)))
        )

    def train(
        self,
        name: str,
        data: str,
        *,
        arch: str,
        epochs: int,
        seed: int,
        batch_size: int,
        lr: float,
        on_epoch: Callable[[EpochProgress], None] | None,
    ) -> ModelVersion:
        req = fleet_pb2.TrainRequest(
            model=name, arch=arch, data=data, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr
        )
        done: ModelVersion | None = None
        for p in self.stream(self._stub.Train, req):
            if p.HasField("version"):
                done = version_from_pb(p.version)  # read on to the end: the call's status
            elif on_epoch is not None and p.step == "epoch":
                on_epoch(
                    EpochStat(
                        epoch=int(p.done),
                        epochs=int(p.total),
                        loss=float(p.fields.get("loss", "nan")),
                        train_accuracy=float(p.fields.get("train_accuracy", "nan")),
                    )
                )
        if done is not None:
            return done
        raise FleetError(f"coordinator at {self.address} ended Train without a result")

    def quantize(
        self,
        ref: ModelRef,
        variants: Sequence[str],
        *,
        max_drop: float,
        force: bool,
        progress: QuantizeProgress,
    ) -> ModelVersion:
        req = fleet_pb2.QuantizeRequest(
            ref=str(ref), variants=list(variants), max_drop=max_drop, force=force
        )
        done: ModelVersion | None = None
        for p in self.stream(self._stub.Quantize, req):
            if p.HasField("version"):
                done = version_from_pb(p.version)
            else:
                progress(p.step, int(p.done), int(p.total))
        if done is not None:
            return done
        raise FleetError(f"coordinator at {self.address} ended Quantize without a result")

    def import_model(self, path: Path, name: str, *, eval_data: Path | None) -> ModelVersion:
        raise InvalidArgument(
            "'fleet models import' reads files on this machine and is not part of FleetService: "
            "run it on the coordinator host without --coordinator"
        )

    def promote(
        self, ref: ModelRef, stage: str, *, archive_existing: bool
    ) -> tuple[ModelVersion, list[int]]:
        resp = self.call(
            self._stub.Promote,
            fleet_pb2.PromoteRequest(ref=str(ref), stage=stage, keep_existing=not archive_existing),
        )
        return version_from_pb(resp.version), list(resp.archived)

    def verify(self, ref: ModelRef) -> tuple[ModelVersion, list[VerifyResult]]:
        from edgefleet.cloud.pipeline import VerifyResult  # numpy, the quantizers

        resp = self.call(self._stub.Verify, fleet_pb2.GetVersionRequest(ref=str(ref)))
        return version_from_pb(resp.version), [
            VerifyResult(variant=r.artifact, ok=r.ok, detail=r.detail) for r in resp.results
        ]

    def export(self, ref: ModelRef, out: Path, *, variants: Sequence[str]) -> list[Path]:
        raise InvalidArgument(
            "'fleet models export' writes artifacts from the coordinator's store and is not part "
            "of FleetService: run it on the coordinator host without --coordinator"
        )

    # -- devices

    def list_devices(
        self,
        selector: Selector | None,
        *,
        state: str | None = None,
        online_only: bool = False,
        where: DeviceFilter | None = None,
    ) -> list[Device]:
        req = fleet_pb2.ListDevicesRequest(
            selector=str(selector) if selector is not None else "",
            state=state or "",
            online_only=online_only,
        )
        if where is not None:
            req.state = req.state or where.state
            req.group = where.group
            req.version = where.version_text
            req.connectivity = where.connectivity
            req.stale_s = where.stale_s
        resp = self.call(self._stub.ListDevices, req)
        return [device_from_pb(d) for d in resp.devices]

    def get_device(self, device_id: str) -> Device:
        return device_from_pb(
            self.call(self._stub.GetDevice, fleet_pb2.GetDeviceRequest(device_id=device_id))
        )

    def enroll_device(
        self, device_id: str, *, group: str, tags: Mapping[str, str]
    ) -> EnrollmentBundle:
        return bundle_from_pb(
            self.call(
                self._stub.EnrollDevice,
                fleet_pb2.EnrollDeviceRequest(device_id=device_id, group=group, tags=dict(tags)),
            )
        )

    def enroll_devices(
        self, specs: Sequence[DeviceSpec], *, skip_existing: bool = False
    ) -> EnrolledBatch:
        req = fleet_pb2.EnrollDevicesRequest(
            devices=[
                fleet_pb2.EnrollDeviceRequest(
                    device_id=d.device_id, group=d.group, tags=dict(d.tags)
                )
                for d in specs
            ],
            skip_existing=skip_existing,
        )
        return self._batch(self._stub.EnrollDevices, req, [d.device_id for d in specs])

    def reissue_devices(self, device_ids: Sequence[str]) -> EnrolledBatch:
        req = fleet_pb2.ReissueDevicesRequest(device_ids=list(device_ids))
        return self._batch(self._stub.ReissueDevices, req, device_ids)

    def _batch(
        self,
        method: Callable[..., Iterable[fleet_pb2.EnrollDevicesReply]],
        req: Message,
        ids: Sequence[str],
    ) -> EnrolledBatch:
        """Read an enrolment answer's pages. Once the first page arrived the batch was
        done on the coordinator: an answer that breaks off later raises `BatchCutOff`
        with the bundles received, so they are not lost."""
        bundles: list[EnrollmentBundle] = []
        existing: list[str] = []
        pages = 0
        try:
            for page in self.stream(method, req):
                pages += 1
                existing.extend(page.existing)
                bundles.extend(bundle_from_pb(b) for b in page.bundles)
        except FleetError as e:
            if not pages:
                raise
            got = {b.device_id for b in bundles} | set(existing)
            raise BatchCutOff(
                str(e),
                EnrolledBatch(bundles=tuple(bundles), existing=tuple(existing)),
                tuple(d for d in ids if d not in got),
            ) from None
        return EnrolledBatch(bundles=tuple(bundles), existing=tuple(existing))

    def status(self) -> FleetStatus:
        r = self.call(self._stub.Status, fleet_pb2.StatusRequest())
        return FleetStatus(
            coordinator=self.address,
            coordinator_version=r.coordinator_version,
            broker_url=r.broker_url,
            devices=r.devices,
            online=r.online,
            by_state=dict(r.by_state),
            replicas=tuple(replica_from_pb(x) for x in r.replicas),
        )

    # -- rollouts

    def create_rollout(
        self, ref: ModelRef, selector: Selector, policy: Policy | None, *, dry_run: bool
    ) -> tuple[Rollout, list[RolloutDevice]]:
        req = fleet_pb2.DeployRequest(ref=str(ref), selector=str(selector), dry_run=dry_run)
        if policy is not None:
            req.policy.CopyFrom(policy_to_pb(policy))
        found: tuple[Rollout, list[RolloutDevice]] | None = None
        for p in self.stream(self._stub.Deploy, req, timeout=self.timeout):
            if p.HasField("rollout"):
                found = rollout_from_pb(p.rollout)
        if found is not None:
            return found
        raise FleetError(f"coordinator at {self.address} ended Deploy without a rollout")

    def list_rollouts(self, *, active_only: bool) -> list[Rollout]:
        resp = self.call(
            self._stub.ListRollouts, fleet_pb2.ListRolloutsRequest(active_only=active_only)
        )
        return [rollout_from_pb(r)[0] for r in resp.rollouts]

    def get_rollout(self, rollout_id: str) -> tuple[Rollout, list[RolloutDevice]]:
        return rollout_from_pb(
            self.call(self._stub.GetRollout, fleet_pb2.GetRolloutRequest(rollout_id=rollout_id))
        )

    def watch_rollout(self, rollout_id: str) -> Iterator[Rollout]:
        req = fleet_pb2.GetRolloutRequest(rollout_id=rollout_id)
        for msg in self.stream(self._stub.WatchRollout, req):
            yield rollout_from_pb(msg)[0]

    def control_rollout(self, rollout_id: str, action: str) -> Rollout:
        msg = self.call(
            self._stub.ControlRollout,
            fleet_pb2.ControlRolloutRequest(rollout_id=rollout_id, action=action),
        )
        return rollout_from_pb(msg)[0]

    # -- drift

    def drift(self, *, by: str, model: str | None) -> list[DriftRow]:
        from edgefleet.cloud.drift.convert import drift_from_pb  # numpy

        resp = self.call(self._stub.GetDrift, fleet_pb2.GetDriftRequest(model=model or "", by=by))
        return [drift_from_pb(r) for r in resp.rows]

    def alerts(self, *, include_resolved: bool) -> list[Alert]:
        from edgefleet.cloud.drift.convert import alert_from_pb  # numpy

        resp = self.call(self._stub.ListAlerts, fleet_pb2.ListAlertsRequest(all=include_resolved))
        return [alert_from_pb(a) for a in resp.alerts]

    def close(self) -> None:
        self._channel.close()
