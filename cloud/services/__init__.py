"""The application layer: the coordinator's parts wired once from settings, and the
typed operations both clients (in-process `LocalClient`, remote `GrpcClient`) and the
`FleetService` servicer are thin adapters over.

- `Services` (wiring): one `Database` per URL, the stores, artifacts, pipeline, keys;
- `FleetApp` (fleet): what works without a running coordinator;
- `LiveRollouts` (live): what needs one (its rollout controller);
- `FleetClient` / `CoordinatorClient` (api): the protocols the CLI is checked against;
- values: `EnrollmentBundle`, `FleetStatus`, `InitResult`, `EpochStat`.
"""

# No imports here: domain modules (cloud/api/convert.py via cloud/inbound.py) import
# services.values, and importing the package must not wire the stores (an import cycle).
