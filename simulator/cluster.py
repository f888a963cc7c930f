"""A simulated fleet spread over several processes (`simulator.worker` each).

One event loop drives a few hundred agents well; a thousand agents, their
downloads, hashing and ONNX Runtime sessions want more than one core. `SimCluster`
splits the fleet into `processes` slices, runs each in a `python -m
simulator.worker` child, and aggregates what they report::

    async with SimCluster(1000, broker_url=url, public_key_pem=pem, state_root=tmp,
                          processes=4) as sim:
        store.enroll_many(device_specs(sim.ids_for_enrollment()))  # one transaction
        await sim.wait(lambda: sim.states()["active"] == 1000, timeout=60)

Device ids and profiles are the same as a one-process `SimulatedFleet` with the
same (n, profile, seed, id_prefix) would have (`simulator.plan`). Faults are routed
to the process that runs the device. Children run in their own process groups and
are killed with them if the parent's `async with` is left by an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.protos.errors import InvalidArgument, NotFound, Unavailable
from edgefleet.simulator.faults import Fault
from edgefleet.simulator.plan import Enrollment, plan
from edgefleet.simulator.profiles import Mix, Profile, parse_profile

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 60.0


@dataclass
class _Worker:
    index: int
    first: int
    n: int
    proc: asyncio.subprocess.Process
    snapshot: dict[str, Any] = field(default_factory=dict)
    ready: asyncio.Future[float] | None = None
    pending: dict[int, asyncio.Future[str | None]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    error: str | None = None


def default_processes(n: int) -> int:
    """One process per ~250 devices, at most one per CPU core and at least one."""
    return max(1, min(os.cpu_count() or 1, -(-n // 250)))


class SimCluster:
    """`n` simulated devices over `processes` worker processes."""

    def __init__(
        self,
        n: int,
        *,
        broker_url: str,
        public_key_pem: str,
        state_root: Path,
        processes: int | None = None,
        profile: str | Profile | Mix = "mixed",
        seed: int = 0,
        topic_prefix: str = "ef/v1",
        id_prefix: str = "sim",
        want_interval: float = 2.0,
        batch_size: int = 100,
        connect_timeout: float = 120.0,
        log_level: str = "WARNING",
        credentials: Mapping[str, str] | None = None,
        telemetry_interval: float = 10.0,
        spread: Sequence[str] = (),
        mqtt_version: str = "auto",
        share_sessions: bool = False,
    ) -> None:
        """`spread`, `mqtt_version` and `share_sessions` as `SimulatedFleet` takes them
        (device i on ``spread[i % k]`` first, counted over the whole cluster; sessions
        are shared within each worker process)."""
        self.profile = parse_profile(profile)
        self.enrollments = plan(n, self.profile, seed=seed, id_prefix=id_prefix)
        k = default_processes(n) if processes is None else processes
        if not 1 <= k <= n:
            raise InvalidArgument(f"processes {k} must be between 1 and the device count {n}")
        self.n = n
        self.processes = k
        self.state_root = state_root
        self._spec: dict[str, Any] = {
            "broker_url": broker_url,
            "public_key_pem": public_key_pem,
            "state_root": str(state_root),
            "profile": self.profile.name,
            "seed": seed,
            "topic_prefix": topic_prefix,
            "id_prefix": id_prefix,
            "total": n,
            "want_interval": want_interval,
            "batch_size": batch_size,
            "connect_timeout": connect_timeout,
            "log_level": log_level,
            "telemetry_interval": telemetry_interval,
            "spread": list(spread),
            "mqtt_version": mqtt_version,
            "share_sessions": share_sessions,
        }
        #: device id -> MQTT password (username = device id); each worker gets its share
        #: in a 0600 file (never on a command line)
        self.credentials: dict[str, str] = dict(credentials or {})
        if isinstance(profile, (Profile, Mix)) and parse_profile(self.profile.name) != profile:
            raise InvalidArgument(
                f"profile {self.profile.name!r} is not a built-in one; a SimCluster's workers "
                "can only use built-in profiles (pass its name)"
            )
        self._workers: list[_Worker] = []
        self._owner: dict[str, _Worker] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self.startup_seconds: float | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> SimCluster:
        start = time.monotonic()
        self.state_root.mkdir(parents=True, exist_ok=True)
        base, extra = divmod(self.n, self.processes)
        first = 0
        try:
            for i in range(self.processes):
                count = base + (1 if i < extra else 0)
                await self._spawn(i, first, count)
                first += count
            for w in self._workers:
                assert w.ready is not None
                await w.ready
        except BaseException:
            await self._kill()
            raise
        self.startup_seconds = time.monotonic() - start
        logger.info(
            "%d simulated devices in %d processes online in %.1fs",
            self.n,
            self.processes,
            self.startup_seconds,
        )
        return self

    async def __aexit__(self, et: type[BaseException] | None, *exc: object) -> None:
        if et is None or issubclass(et, (asyncio.CancelledError, KeyboardInterrupt)):
            await self.stop()
        else:
            await self._kill()

    async def _spawn(self, index: int, first: int, n: int) -> None:
        spec = dict(self._spec, n=n, first=first)
        spec["log_file"] = str(self.state_root / f"worker-{index}.log")
        if self.credentials:
            mine = {
                e.device_id: self.credentials[e.device_id]
                for e in self.enrollments[first : first + n]
                if e.device_id in self.credentials
            }
            path = self.state_root / f"worker-{index}.credentials.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            spec["passwords_file"] = str(path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgefleet.simulator.worker",
            json.dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=1 << 20,
        )
        w = _Worker(index, first, n, proc, ready=asyncio.get_running_loop().create_future())
        w.reader = asyncio.create_task(self._read(w), name=f"sim-worker-{index}")
        self._workers.append(w)
        for e in self.enrollments[first : first + n]:
            self._owner[e.device_id] = w

    async def _read(self, w: _Worker) -> None:
        assert w.proc.stdout is not None
        while line := await w.proc.stdout.readline():
            try:
                ev = json.loads(line)
            except ValueError:
                logger.warning("simulator worker %d wrote a non-JSON line: %r", w.index, line[:200])
                continue
            kind = ev.pop("event", None)
            if kind == "ready":
                if w.ready and not w.ready.done():
                    w.ready.set_result(float(ev["startup_s"]))
            elif kind == "states":
                w.snapshot = ev
                self._changed.set()
            elif kind == "done":
                fut = w.pending.pop(ev.get("id"), None)
                if fut and not fut.done():
                    fut.set_result(ev.get("error"))
            elif kind == "error":
                w.error = str(ev.get("error"))
        code = await w.proc.wait()
        why = w.error or f"exited with code {code}"
        if w.ready and not w.ready.done():
            w.ready.set_exception(
                Unavailable(
                    f"simulator worker {w.index} (devices {w.first}..{w.first + w.n - 1}) "
                    f"did not start: {why}; see {self.state_root / f'worker-{w.index}.log'}"
                )
            )
        for fut in w.pending.values():
            if not fut.done():
                fut.set_result(f"simulator worker {w.index} {why}")
        w.pending.clear()
        self._changed.set()

    async def stop(self, *, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every worker cleanly (EOF on stdin: agents send offline and disconnect)."""
        for w in self._workers:
            if w.proc.stdin and not w.proc.stdin.is_closing():
                w.proc.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(w.proc.wait() for w in self._workers))
        except TimeoutError:
            logger.warning("simulator workers still running after %.0fs; killing them", timeout)
        await self._kill()

    async def _kill(self) -> None:
        for w in self._workers:
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.proc.pid, signal.SIGKILL)
        for w in self._workers:
            await w.proc.wait()
            if w.reader:
                await asyncio.gather(w.reader, return_exceptions=True)

    # -- observation ------------------------------------------------------------------

    def ids(self) -> list[str]:
        return [e.device_id for e in self.enrollments]

    def ids_for_enrollment(self) -> list[Enrollment]:
        return list(self.enrollments)

    def states(self) -> Counter[str]:
        """How many devices are in each update state, summed over the workers' last reports."""
        out: Counter[str] = Counter()
        for w in self._workers:
            out.update(w.snapshot.get("states", {}))
        return out

    def active_variants(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for w in self._workers:
            out.update(w.snapshot.get("variants", {}))
        return out

    def active_versions(self) -> Counter[str]:
        """How many devices serve each model version ("model:version")."""
        out: Counter[str] = Counter()
        for w in self._workers:
            out.update(w.snapshot.get("versions", {}))
        return out

    def predictions(self) -> int:
        """Live predictions made so far by the running traffic (`traffic`, `partition_traffic`)."""
        return sum(int(w.snapshot.get("predictions", 0)) for w in self._workers)

    def sessions_opened(self) -> list[int] | None:
        """Per worker, the model sessions its shared loader opened (`share_sessions`), or
        None when sessions are not shared."""
        got = [w.snapshot.get("sessions_opened") for w in self._workers]
        if any(g is None for g in got):
            return None
        return [int(g) for g in got if g is not None]

    def online(self) -> int:
        return sum(int(w.snapshot.get("online", 0)) for w in self._workers)

    def failed_workers(self) -> list[str]:
        return [
            f"worker {w.index}: {w.error or f'exit {w.proc.returncode}'}"
            for w in self._workers
            if w.proc.returncode is not None
        ]

    async def wait(
        self, predicate: Callable[[], bool], timeout: float, *, what: str = "condition"
    ) -> None:
        """Wait until `predicate` holds on the aggregated reports; TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if failed := self.failed_workers():
                raise Unavailable(f"{what}: simulator workers stopped: {'; '.join(failed)}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{what} not met within {timeout:g}s "
                    f"(states {dict(self.states())}, online {self.online()}/{self.n})"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self._changed.wait()

    # -- faults -----------------------------------------------------------------------

    async def command(self, cmd: str, ids: str | Iterable[str], **args: Any) -> None:
        """Send a fault command to the workers running `ids`; raise what they answer."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        by_worker: dict[int, list[str]] = {}
        for i in ids:
            w = self._owner.get(i)
            if w is None:
                raise NotFound(f"no simulated device {i!r} in this cluster of {self.n}")
            by_worker.setdefault(w.index, []).append(i)
        futs = []
        for index, chunk in by_worker.items():
            w = self._workers[index]
            self._seq += 1
            fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            w.pending[self._seq] = fut
            assert w.proc.stdin is not None
            w.proc.stdin.write(
                (json.dumps({"id": self._seq, "cmd": cmd, "ids": chunk, **args}) + "\n").encode()
            )
            await w.proc.stdin.drain()
            futs.append(fut)
        errors = [e for e in await asyncio.gather(*futs) if e]
        if errors:
            raise InvalidArgument(f"simulator {cmd}: {'; '.join(errors)}")

    async def traffic(
        self, data: Path, *, rate: float, seed: int = 0, labelled: float = 1.0
    ) -> None:
        """Live predictions on every device from one shared set: `data` is an .npz with X
        (and y); `rate` per device per second, 0 stops them; `labelled` share with labels."""
        await self.command(
            "traffic", self.ids(), data=str(data), rate=rate, seed=seed, labelled=labelled
        )

    async def partition_traffic(
        self,
        *,
        rate: float,
        labelled: float = 1.0,
        dataset: str = "digits",
        alpha: float = 10.0,
        seed: int = 0,
    ) -> None:
        """Live predictions on every device from its own non-IID partition of `dataset`
        (the same split whatever the number of processes); `rate` 0 stops them."""
        if rate < 0:
            raise InvalidArgument(f"--traffic {rate:g}: predictions per second per device, >= 0")
        if not 0.0 <= labelled <= 1.0:
            raise InvalidArgument(f"--labelled {labelled:g}: a share between 0 and 1, e.g. 0.5")
        await self.command(
            "traffic",
            self.ids(),
            rate=rate,
            labelled=labelled,
            dataset=dataset,
            alpha=alpha,
            seed=seed,
            total=self.n,
        )

    async def drop_link(self, ids: str | Iterable[str]) -> None:
        await self.command("drop_link", ids)

    async def drift(
        self, ids: str | Iterable[str], *, shift: float = 0.0, scale: float = 1.0
    ) -> None:
        """Shift/scale these devices' live inputs (``x * scale + shift``); 0 and 1 end it."""
        await self.command("drift", ids, shift=shift, scale=scale)

    async def crash(self, ids: str | Iterable[str], *, reboot_after: float = -1.0) -> None:
        """Kill the agents abruptly; boot them again after `reboot_after` s (< 0: never)."""
        await self.command("crash", ids, reboot_after=reboot_after)

    async def restart(self, ids: str | Iterable[str]) -> None:
        await self.command("restart", ids)

    async def corrupt_next_chunks(self, ids: str | Iterable[str], n: int) -> None:
        await self.command("corrupt", ids, n=n)

    async def lose_next_chunks(self, ids: str | Iterable[str], n: int) -> None:
        await self.command("lose", ids, n=n)

    async def slow_link(self, ids: str | Iterable[str], bytes_per_s: float) -> None:
        await self.command("slow_link", ids, bytes_per_s=bytes_per_s)

    async def inject(self, fault: Fault, *, seed: int = 0) -> list[str]:
        """Apply one fault of a plan now; returns the devices it hit."""
        ids = fault.pick(self.ids(), seed, groups={e.device_id: e.group for e in self.enrollments})
        if fault.kind == "corrupt":
            await self.corrupt_next_chunks(ids, int(fault.arg))
        elif fault.kind == "lose":
            await self.lose_next_chunks(ids, int(fault.arg))
        elif fault.kind == "slow_link":
            await self.slow_link(ids, fault.arg)
        elif fault.kind == "crash":
            await self.crash(ids, reboot_after=fault.arg)
        elif fault.kind == "drift":
            await self.drift(ids, shift=fault.arg, scale=fault.scale)
        else:
            await self.command(fault.kind, ids)
        return ids

    async def run_faults(
        self,
        faults: Sequence[Fault],
        *,
        seed: int = 0,
        on_fault: Callable[[Fault, list[str]], None] | None = None,
    ) -> None:
        """Apply a fault plan, each fault `at` seconds after this call."""
        start = time.monotonic()
        for f in sorted(faults, key=lambda f: f.at):
            await asyncio.sleep(max(0.0, start + f.at - time.monotonic()))
            ids = await self.inject(f, seed=seed)
            if on_fault is not None:
                on_fault(f, ids)


__all__ = ["SimCluster", "default_processes"]
