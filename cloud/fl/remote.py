"""The `fleet fl` client: FederatedService over the same channel and token as GrpcClient."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from edgefleet.cloud.api.convert import enrollment_from_pb, request_to_pb, run_from_pb
from edgefleet.cloud.fl.federation import FlEnrollment, RunRequest
from edgefleet.cloud.fl.store import FlRun
from edgefleet.cloud.remote import GrpcClient
from edgefleet.protos.errors import FleetError
from edgefleet.protos.fleet.v1 import federated_pb2, federated_pb2_grpc


class FederatedClient:
    def __init__(self, client: GrpcClient) -> None:
        self.client = client
        self._stub = federated_pb2_grpc.FederatedServiceStub(client.channel)

    def start(self, req: RunRequest, on_update: Callable[[FlRun], None]) -> FlRun:
        return self._follow(self._stub.StartRun, request_to_pb(req), on_update)

    def watch(self, run_id: str, on_update: Callable[[FlRun], None]) -> FlRun:
        return self._follow(self._stub.WatchRun, federated_pb2.RunRequest(run_id=run_id), on_update)

    def _follow(
        self,
        method: Callable[..., Iterator[federated_pb2.RunInfo]],
        request: object,
        on_update: Callable[[FlRun], None],
    ) -> FlRun:
        last: FlRun | None = None
        for m in self.client._stream(method, request, timeout=None):
            last = run_from_pb(m)  # type: ignore[arg-type]
            on_update(last)
        if last is None or not last.final:
            raise FleetError(f"coordinator at {self.client.address} ended the run stream early")
        return last

    def get(self, run_id: str) -> FlRun:
        return run_from_pb(
            self.client._call(self._stub.GetRun, federated_pb2.RunRequest(run_id=run_id))
        )

    def list(self, *, model: str | None = None, limit: int = 50) -> list[FlRun]:
        resp = self.client._call(
            self._stub.ListRuns, federated_pb2.ListRunsRequest(model=model or "", limit=limit)
        )
        return [run_from_pb(r) for r in resp.runs]

    def enroll(self, device_id: str) -> FlEnrollment:
        return enrollment_from_pb(
            self.client._call(
                self._stub.EnrollNode, federated_pb2.EnrollNodeRequest(device_id=device_id)
            )
        )
