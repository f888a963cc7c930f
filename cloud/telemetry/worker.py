"""One telemetry ingest worker process (`python -m edgefleet.cloud.telemetry.worker`).

`fleet serve --ingest-workers N` starts N of these (`cloud.telemetry.pool`): each is
the same `TelemetrySubscriber` + `TelemetryIngest` the coordinator runs in-process
(own MQTT connection in the shared subscription group, own database connection,
the same decode at the `cloud.inbound` boundary, acknowledgements after commit),
in a process of its own so that N of them use N cores instead of sharing one GIL.

Protocol with the parent, over pipes (secrets never on the command line):
- stdin: first line, the `WorkerSpec` as JSON; then nothing. End of file (the
  parent stopped or died) stops the worker: it flushes what it buffered and exits.
- stdout: one JSON line of counters every `STATS_EVERY` seconds and a last one at
  exit (`stats()`); the parent sums them for /metrics.
- stderr: logging.
SIGTERM stops it as end of file does.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

from edgefleet.protos.transport import MqttSettings

logger = logging.getLogger(__name__)

STATS_EVERY = 0.5  # seconds between counter lines

#: the `TelemetryIngest` counters a worker reports (cloud.metrics.ingest_families)
COUNTERS = (
    "received",
    "written",
    "duplicated",
    "rejected",
    "refused_rows",
    "refused",
    "acked",
    "write_errors",
)


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs: the database, the broker (its own client id), whether
    its session is persistent (a stable client id per worker slot resumes it)."""

    db_url: str
    mqtt: dict[str, Any]  # `MqttSettings` fields
    persistent: bool = True
    interval: float = 0.25  # writer flush interval (TelemetryIngest)
    touch_devices: bool = True  # mark devices seen after each batch (devices.touch)
    log_level: int = logging.INFO

    @classmethod
    def of(cls, db_url: str, settings: MqttSettings, **kw: Any) -> WorkerSpec:
        d = asdict(settings)
        d["mqtt_version"] = str(settings.mqtt_version)
        d["fallback_urls"] = list(settings.fallback_urls)
        return cls(db_url=db_url, mqtt=d, **kw)

    def settings(self) -> MqttSettings:
        d = dict(self.mqtt)
        d["fallback_urls"] = tuple(d.get("fallback_urls") or ())
        return MqttSettings(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def stats(
    ingest: Any, *, connected: bool, shared: bool, connected_at: float = 0.0, final: bool = False
) -> dict[str, Any]:
    """One counter line: the ingest's counters, its latency histograms and refusals."""
    out: dict[str, Any] = {k: int(getattr(ingest, k)) for k in COUNTERS}
    out["pending"] = int(ingest.pending)
    out["connected"] = connected
    out["connected_at"] = connected_at
    out["committed_at"] = float(ingest.committed_at)
    out["cpu_ms"] = int(time.process_time() * 1000)  # this process's CPU so far (benchmarks)
    out["shared"] = shared
    out["final"] = final
    out["latency"] = ingest.latency.snapshot()
    out["refusals"] = [[k, r, n] for (k, r), n in ingest.refusals.snapshot().items()]
    return out


def run(spec: WorkerSpec, stdin: IO[str], stdout: IO[str]) -> int:
    from edgefleet.cloud.db import Database
    from edgefleet.cloud.devices import DeviceStore
    from edgefleet.cloud.telemetry.ingest import TelemetryIngest, TelemetrySubscriber
    from edgefleet.cloud.telemetry.store import TelemetryStore

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_parent() -> None:
        stdin.read()  # returns at end of file: the parent closed the pipe or died
        stop.set()

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    db = Database(spec.db_url, what="telemetry database")
    devices = DeviceStore(db) if spec.touch_devices else None
    ingest = TelemetryIngest(
        TelemetryStore(db),
        interval=spec.interval,
        on_written=devices.touch if devices is not None else None,
    )
    sub = TelemetrySubscriber(spec.settings(), ingest, persistent=spec.persistent)

    def report(final: bool = False) -> None:
        line = stats(
            ingest,
            connected=sub.connected.is_set(),
            shared=sub.subscription != sub.filter,
            connected_at=sub.connected_at,
            final=final,
        )
        stdout.write(json.dumps(line) + "\n")
        stdout.flush()

    sub.start(timeout=None)  # paho keeps trying; `connected` in the counter lines says
    try:
        while not stop.wait(STATS_EVERY):
            report()
    finally:
        sub.stop()  # flushes what is buffered while the database answers
        report(final=True)
        db.close()
    return 0


def main() -> None:
    line = sys.stdin.readline()
    spec = WorkerSpec.from_json(line)
    logging.basicConfig(
        level=spec.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s ingest-worker[{spec.mqtt.get('client_id', '?')}] "
        "%(levelname)s %(name)s: %(message)s",
    )
    sys.exit(run(spec, sys.stdin, sys.stdout))


if __name__ == "__main__":
    main()
