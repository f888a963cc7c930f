"""N telemetry ingest worker processes, supervised (`fleet serve --ingest-workers N`).

One ingest process is bound to one core by the GIL (~93 µs of Python per message,
BENCHMARKS.md): decoding, row binding, acknowledging and paho's own packet work all
take turns. `IngestPool` starts N `cloud.telemetry.worker` processes, each its own
MQTT client in the shared subscription group (``$share/fleet-ingest/…``, the one the
in-process subscriber and other replicas use), so the broker splits the devices'
windows between them, and each writes its share with its own database connection.

- Worker k always uses client id ``<client_id>-w<k>``: a persistent session
  survives the worker, so a restarted worker resumes its share of the queue.
- A worker that exits (crash, SIGKILL) is started again after a capped, jittered
  backoff; what it had buffered but not committed was never acknowledged to the
  devices, which send those windows again (their spools); the (device, seq) key
  drops any window stored twice.
- Its counters are summed for /metrics (`received`, `written`, … as on
  `TelemetryIngest`), including those of workers that have exited.
- A broker without shared subscriptions (NATS's MQTT, a 3.1.1-only broker that
  refuses ``$share``) makes each worker fall back to the plain filter, i.e. every
  worker would receive every window. The pool then keeps worker 0 only and stops
  the others (logged): rows would stay exactly-once through the (device, seq) key,
  but each extra worker would only redo the same work.

It needs nothing from the leader: every replica may run its own pool.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import IO, Any

from edgefleet.cloud.metrics import LatencyHistograms
from edgefleet.cloud.telemetry.worker import COUNTERS, WorkerSpec
from edgefleet.protos.backoff import Backoff
from edgefleet.protos.errors import InvalidArgument, Unavailable
from edgefleet.protos.transport import MqttSettings

logger = logging.getLogger(__name__)

#: a worker that stayed up this long starts its next restart backoff from the beginning
STABLE_S = 30.0
MAX_WORKERS = 16


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[str] | None = None
    last: dict[str, Any] = field(default_factory=dict)  # its latest counter line
    started: float = 0.0
    attempt: int = 0
    restart_at: float = 0.0
    retired: bool = False  # not restarted (no shared subscriptions on this broker)
    before: Counter[str] = field(default_factory=Counter)  # its exited processes' counters
    reader: threading.Thread | None = None


class IngestPool:
    """`start()` / `stop()`; the `TelemetryIngest` counters, summed over the workers."""

    def __init__(
        self,
        workers: int,
        *,
        db_url: str,
        settings: MqttSettings,
        persistent: bool = True,
        interval: float = 0.25,
        touch_devices: bool = True,
        backoff: Backoff = Backoff(base=0.5, cap=10.0),
        poll: float = 0.2,
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise InvalidArgument(
                f"--ingest-workers {workers} is out of range; accepted: 0 (ingest in the "
                f"coordinator process) or 1 to {MAX_WORKERS} worker processes"
            )
        self.workers = workers
        self.settings = settings
        self.backoff = backoff
        self.poll = poll
        self._spec = WorkerSpec.of(
            db_url,
            settings,
            persistent=persistent,
            interval=interval,
            touch_devices=touch_devices,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        self._slots = [_Slot(k) for k in range(workers)]
        self._lock = threading.Lock()
        self._retired: Counter[str] = Counter()  # counters of worker processes that exited
        self._retired_latency: list[Any] = []
        self._retired_refusals: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0
        self.unshared = False  # a worker found that the broker refuses $share

    # -- lifecycle ------------------------------------------------------------------

    def start(self, *, timeout: float = 30.0) -> None:
        """Start every worker and wait until each is connected to the broker."""
        self._stop.clear()
        for slot in self._slots:
            self._spawn(slot)
        self._supervisor = threading.Thread(target=self._supervise, name="ingest-pool", daemon=True)
        self._supervisor.start()
        deadline = time.monotonic() + timeout
        while not all(s.retired or s.last.get("connected") for s in self._slots):
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(
                    f"telemetry ingest workers could not connect to {self.settings.url} "
                    f"in {timeout:g}s"
                )
            time.sleep(0.05)

    def stop(self, *, timeout: float = 30.0) -> None:
        """Close each worker's stdin (it flushes and exits), then wait; SIGKILL after
        `timeout`."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        procs = [s for s in self._slots if s.proc is not None]
        for s in procs:
            assert s.proc is not None and s.proc.stdin is not None
            with contextlib.suppress(OSError):
                s.proc.stdin.close()
        deadline = time.monotonic() + timeout
        for s in procs:
            assert s.proc is not None
            try:
                s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("ingest worker %d did not stop in %gs: killed", s.index, timeout)
                s.proc.kill()
                s.proc.wait()
            if s.reader is not None:
                s.reader.join(5)
            self._retire(s)

    @property
    def pids(self) -> list[int | None]:
        """Each slot's current worker process id (None while it waits for a restart)."""
        return [
            s.proc.pid if s.proc is not None and s.proc.poll() is None else None
            for s in self._slots
        ]

    # -- counters (the `TelemetryIngest` interface cloud.metrics reads) ---------------

    def _sum(self, key: str) -> int:
        with self._lock:
            return self._retired[key] + sum(int(s.last.get(key, 0)) for s in self._slots)

    @property
    def received(self) -> int:
        return self._sum("received")

    @property
    def written(self) -> int:
        return self._sum("written")

    @property
    def duplicated(self) -> int:
        return self._sum("duplicated")

    @property
    def rejected(self) -> int:
        return self._sum("rejected")

    @property
    def refused_rows(self) -> int:
        return self._sum("refused_rows")

    @property
    def refused(self) -> int:
        return self._sum("refused")

    @property
    def acked(self) -> int:
        return self._sum("acked")

    @property
    def write_errors(self) -> int:
        return self._sum("write_errors")

    def per_worker(self, key: str) -> list[int]:
        """One counter per worker slot, its exited processes included."""
        with self._lock:
            return [s.before[key] + int(s.last.get(key, 0)) for s in self._slots]

    @property
    def cpu_s(self) -> float:
        """CPU seconds the worker processes used, exited ones included (start-up too)."""
        return self._sum("cpu_ms") / 1000

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(int(s.last.get("pending", 0)) for s in self._slots if s.proc is not None)

    @property
    def latency(self) -> LatencyHistograms:
        """The workers' latency histograms added up (a fresh object per call)."""
        h = LatencyHistograms()
        with self._lock:
            snaps = [*self._retired_latency, *(s.last.get("latency", []) for s in self._slots)]
        for snap in snaps:
            h.merge(snap)
        return h

    @property
    def connected_at(self) -> float:
        """time.time() at which the first current worker connected (0: none yet)."""
        with self._lock:
            times = [float(s.last.get("connected_at") or 0) for s in self._slots]
        return min((t for t in times if t), default=0.0)

    @property
    def committed_at(self) -> float:
        """time.time() of the latest batch a current worker committed (0: none yet)."""
        with self._lock:
            return max((float(s.last.get("committed_at") or 0) for s in self._slots), default=0.0)

    def refusal_counts(self) -> dict[tuple[str, str], int]:
        """Messages the workers refused at the boundary, by (kind, reason)."""
        with self._lock:
            out = Counter(self._retired_refusals)
            for s in self._slots:
                for kind, reason, n in s.last.get("refusals", []):
                    out[(kind, reason)] += int(n)
        return dict(out)

    # -- workers ----------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        spec = replace(
            self._spec,
            mqtt={
                **self._spec.mqtt,
                "client_id": worker_client_ids(
                    self.settings.client_id, range(slot.index, slot.index + 1)
                )[0],
            },
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.cloud.telemetry.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches the coordinator only
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(spec.to_json() + "\n")
        proc.stdin.flush()
        slot.proc, slot.started, slot.last = proc, time.monotonic(), {}
        slot.reader = threading.Thread(
            target=self._read,
            args=(slot, proc.stdout),
            name=f"ingest-worker-{slot.index}",
            daemon=True,
        )
        slot.reader.start()
        logger.info("telemetry ingest worker %d started (pid %d)", slot.index, proc.pid)

    def _read(self, slot: _Slot, out: IO[str]) -> None:
        for line in out:
            try:
                stats = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                slot.last = stats
            if not stats.get("shared", True) and stats.get("connected") and not self.unshared:
                self.unshared = True
                logger.warning(
                    "the broker refused the shared subscription: every ingest worker "
                    "would get every telemetry window; keeping worker 0 only"
                )

    def _retire(self, slot: _Slot) -> None:
        """Fold an exited worker's last counters into the totals."""
        with self._lock:
            for k in (*COUNTERS, "cpu_ms"):
                self._retired[k] += int(slot.last.get(k, 0))
                slot.before[k] += int(slot.last.get(k, 0))
            if slot.last.get("latency"):
                self._retired_latency.append(slot.last["latency"])
            for kind, reason, n in slot.last.get("refusals", []):
                self._retired_refusals[(kind, reason)] += int(n)
            slot.last = {}
            slot.proc = None

    def _supervise(self) -> None:
        while not self._stop.wait(self.poll):
            now = time.monotonic()
            for slot in self._slots:
                if self.unshared and slot.index > 0 and not slot.retired:
                    slot.retired = True
                    if slot.proc is not None:
                        slot.proc.terminate()
                if slot.proc is not None:
                    code = slot.proc.poll()
                    if code is None:
                        continue
                    if slot.reader is not None:
                        slot.reader.join(5)
                    self._retire(slot)
                    if slot.retired:
                        continue
                    slot.attempt = 1 if now - slot.started > STABLE_S else slot.attempt + 1
                    delay = self.backoff.delay(slot.attempt)
                    slot.restart_at = now + delay
                    logger.warning(
                        "telemetry ingest worker %d exited (code %s); restarting, "
                        "retrying in %.1fs (attempt %d)",
                        slot.index,
                        code,
                        delay,
                        slot.attempt,
                    )
                elif not slot.retired and now >= slot.restart_at:
                    self.restarts += 1
                    self._spawn(slot)


def worker_client_ids(client_id: str, workers: range) -> list[str]:
    return [f"{client_id}-w{k}" for k in workers]


def forget_sessions(settings: MqttSettings, client_ids: list[str], *, timeout: float = 5.0) -> int:
    """End the persistent sessions of `client_ids` at the broker (connect with a clean
    session, disconnect). A persistent session that nobody resumes stays in the shared
    group and takes its share of every device's windows, which then wait there until
    the devices send them again: so when `--ingest-workers` changes, the sessions of
    the in-process subscriber or of the slots no longer used are ended (what they held
    was not acknowledged to the devices, which send it again). Returns how many ended."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ended = 0
    ep = settings.endpoint
    for cid in client_ids:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311, clean_session=True
        )
        if settings.username is not None:
            c.username_pw_set(settings.username, settings.password)
        if ep.tls:
            c.tls_set_context(settings.tls_context())
        done = threading.Event()
        c.on_connect = lambda _c, _u, _f, rc, _p, d=done: None if rc.is_failure else d.set()
        try:
            c.connect(ep.host, ep.port, 10)
            c.loop_start()
            if done.wait(timeout):
                ended += 1
            c.disconnect()
            c.loop_stop()
        except OSError as e:  # not fatal: the windows it holds come again from the devices
            logger.warning("could not end stale MQTT sessions (%s first): %s", cid, e)
            break  # the broker is not reachable now: do not wait for each of them
    return ended


__all__ = ["MAX_WORKERS", "IngestPool", "forget_sessions", "worker_client_ids"]
