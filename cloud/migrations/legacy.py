"""What release 0.1.0 left: its tables and their columns (= revision 0001's).

0.1.0 made its tables with `create_all` and had no version table; a database with any of
these tables and no `alembic_version` is at revision 0001 once its columns match.
A test checks this against what revision 0001 creates.
"""

from __future__ import annotations

BASELINE = "0001"

LEGACY_TABLES: dict[str, frozenset[str]] = {
    "devices": frozenset(
        {
            "id",
            "device_id",
            "group",
            "tags",
            "enrolled_at",
            "online",
            "last_seen",
            "boot_id",
            "agent_version",
            "capabilities",
            "active",
            "reported",
            "desired_generation",
            "desired",
            "rollout_id",
        }
    ),
    "drift_alerts": frozenset(
        {
            "id",
            "scope",
            "subject",
            "model",
            "version",
            "metric",
            "state",
            "psi",
            "max_psi",
            "threshold",
            "rows",
            "detail",
            "first_seen_ms",
            "last_seen_ms",
            "resolved_ms",
        }
    ),
    "drift_sketches": frozenset(
        {"id", "device_id", "seq", "window_end_ms", "model", "version", "variant", "rows", "counts"}
    ),
    "fl_nodes": frozenset({"id", "device_id", "public_key", "node_id", "enrolled_at"}),
    "fl_runs": frozenset(
        {
            "id",
            "run_id",
            "model",
            "parent_version",
            "strategy",
            "rounds",
            "config",
            "status",
            "reason",
            "participants",
            "skipped",
            "history",
            "flower_run_id",
            "result_version",
            "deploy",
            "created_at",
            "finished_at",
        }
    ),
    "model_versions": frozenset(
        {
            "id",
            "model_id",
            "version",
            "stage",
            "arch",
            "spec",
            "metrics",
            "lineage",
            "checkpoint_sha256",
            "evalset_sha256",
            "created_at",
        }
    ),
    "models": frozenset({"id", "name", "created_at"}),
    "rollout_devices": frozenset(
        {
            "id",
            "rollout_id",
            "device_id",
            "stage",
            "variant",
            "sha256",
            "previous",
            "phase",
            "action",
            "generation",
            "state",
            "reason",
            "detail",
            "last_seen",
            "shadow",
        }
    ),
    "rollouts": frozenset(
        {
            "id",
            "rollout_id",
            "ref",
            "model",
            "version",
            "selector",
            "policy",
            "state",
            "reason",
            "stage",
            "stages",
            "skipped",
            "created_at",
            "updated_at",
            "finished_at",
        }
    ),
    "telemetry": frozenset(
        {
            "id",
            "device_id",
            "seq",
            "window_start_ms",
            "window_end_ms",
            "received_ms",
            "model",
            "version",
            "variant",
            "predictions",
            "errors",
            "latency_bounds",
            "latency_counts",
            "latency_sum_us",
            "latency_count",
            "rss_bytes",
            "cpu_percent",
            "spooled",
        }
    ),
    "telemetry_hourly": frozenset(
        {
            "device_id",
            "hour_ms",
            "model",
            "version",
            "windows",
            "predictions",
            "errors",
            "latency_bounds",
            "latency_counts",
            "latency_sum_us",
            "latency_count",
            "rss_max",
        }
    ),
    "variants": frozenset(
        {
            "id",
            "version_id",
            "name",
            "runtime",
            "sha256",
            "size",
            "accuracy",
            "latency_ms",
            "quantization",
            "deployable",
            "reason",
            "signed_manifest",
            "created_at",
        }
    ),
}
