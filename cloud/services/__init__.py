"""The application layer: the coordinator's parts wired once from settings, and the
typed operations both clients (in-process `LocalClient`, remote `GrpcClient`) and the
`FleetService` servicer are thin adapters over.

- `Services` (wiring): one `Database` per URL, the stores, artifacts, pipeline, keys;
- `FleetApp` (fleet): what works without a running coordinator;
- `LiveRollouts` (live): what needs one (its rollout controller);
- `FleetClient` / `CoordinatorClient` (api): the protocols the CLI is checked against;
- values: `EnrollmentBundle`, `FleetStatus`, `InitResult`, `EpochStat`.
"""

from edgefleet.cloud.services.api import CoordinatorClient, FleetClient, QuantizeProgress
from edgefleet.cloud.services.values import (
    BUNDLE_FORMAT,
    EnrollmentBundle,
    EpochProgress,
    EpochStat,
    FleetStatus,
    InitResult,
)
from edgefleet.cloud.services.wiring import Services

__all__ = [
    "BUNDLE_FORMAT",
    "CoordinatorClient",
    "EnrollmentBundle",
    "EpochProgress",
    "EpochStat",
    "FleetClient",
    "FleetStatus",
    "InitResult",
    "QuantizeProgress",
    "Services",
]
