"""edgefleet's Flower App: one ServerApp and one ClientApp over the `models/` definitions.

Both sides import it: the coordinator's SuperLink runs `server_app:app` (in a
`flwr-serverapp` process), each device's SuperNode runs `client_app:app` on the
device's own `.npz` shards, and the simulator runs the same ClientApp in Flower's
simulation runtime. `APP_DIR` is the folder `flwr run` submits (a pyproject.toml
naming these components and the run-config keys with their defaults).

Run config in, results out: the ServerApp reads the starting checkpoint from
`checkpoint` and writes what it did to `output-dir` (open-source Flower has no way
to pull a run's result back): `events.jsonl` (one JSON object per line: the
participants it found, each round's metrics, then `done` or `failed`) and, on
success, `weights.npz` (a `models.checkpoint` file), written before `done`.
"""

from __future__ import annotations

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"
EVENTS_FILE = "events.jsonl"
WEIGHTS_FILE = "weights.npz"

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedmedian", "fedtrimmedavg", "krum")

__all__ = ["APP_DIR", "EVENTS_FILE", "STRATEGIES", "WEIGHTS_FILE"]
