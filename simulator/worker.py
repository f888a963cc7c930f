"""One simulator process: a slice of a fleet on its own event loop, driven over pipes.

`simulator.cluster.SimCluster` starts one of these per process with
``python -m simulator.worker SPEC_JSON``. The worker runs a `SimulatedFleet` for
its slice and speaks JSON lines:

- stdout, worker → parent: ``{"event": "ready", "startup_s": …}`` once every
  device is connected, then ``{"event": "states", "states": {...},
  "variants": {...}, "online": k, "boots": b}`` whenever something changed
  (checked every ``interval`` seconds), ``{"event": "done", "id": N, "error": …}``
  after each command, and ``{"event": "error", "error": …}`` if it fails.
- stdin, parent → worker: ``{"id": N, "cmd": "drop_link" | "crash" | "restart" |
  "corrupt" | "slow_link" | "drift" | "traffic" | "stop", ...}``. EOF on stdin stops the fleet cleanly.

Logs go to stderr (and the worker's own log file when the spec names one), so
stdout carries nothing but the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from edgefleet.protos.errors import FleetError, InvalidArgument

logger = logging.getLogger(__name__)


def _emit(event: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the parent is gone; EOF on stdin stops the fleet
        pass


def _snapshot(fleet: Any) -> dict[str, Any]:
    return {
        "states": dict(fleet.states()),
        "variants": dict(fleet.active_variants()),
        "online": fleet.online(),
        "boots": sum(d.boots for d in fleet.devices),
        "versions": dict(fleet.active_versions()),
        "predictions": sum(t.predictions for t in _traffic),
        "sessions_opened": fleet.shared_sessions.opened if fleet.shared_sessions else None,
    }


_background: set[asyncio.Task[None]] = set()
_traffic: list[Any] = []  # the running Traffic, if any


async def _reboot_later(fleet: Any, ids: list[str], delay: float) -> None:
    await asyncio.sleep(delay)
    for i in ids:
        try:
            await fleet.device(i).start()
        except FleetError as e:
            logger.warning("%s: could not reboot after a crash: %s", i, e)


async def _apply(fleet: Any, cmd: dict[str, Any]) -> None:
    what = cmd.get("cmd")
    ids = cmd.get("ids") or []
    if what == "drop_link":
        fleet.drop_link(ids)
    elif what == "crash":
        for i in ids:
            await fleet.crash(i)
        reboot = float(cmd.get("reboot_after", -1))
        if reboot >= 0:
            task = asyncio.create_task(_reboot_later(fleet, ids, reboot))
            _background.add(task)
            task.add_done_callback(_background.discard)
    elif what == "restart":
        await asyncio.gather(*(fleet.restart(i) for i in ids))
    elif what == "corrupt":
        for i in ids:
            fleet.corrupt_next_chunks(i, int(cmd.get("n", 1)))
    elif what == "lose":
        for i in ids:
            fleet.lose_next_chunks(i, int(cmd.get("n", 1)))
    elif what == "slow_link":
        for i in ids:
            fleet.slow_link(i, float(cmd["bytes_per_s"]))
    elif what == "drift":
        fleet.drift(ids, shift=float(cmd.get("shift", 0.0)), scale=float(cmd.get("scale", 1.0)))
    elif what == "traffic":
        _start_traffic(fleet, ids, cmd)
    else:
        raise InvalidArgument(
            f"simulator command {what!r} unknown; accepted: drop_link, crash, restart, "
            "corrupt, lose, slow_link, drift, traffic, stop"
        )


def _start_traffic(fleet: Any, ids: list[str], cmd: dict[str, Any]) -> None:
    """Live predictions on these devices, `rate` per device per second (0 stops them), a
    `labelled` share with labels; rows from an .npz (X, y) in `data`, or, with
    `dataset`, from each device's own partition of that dataset (`partitions`)."""
    import numpy as np

    from edgefleet.simulator.traffic import Traffic

    for t in _traffic:
        t.stop()
    _traffic.clear()
    rate = float(cmd.get("rate", 0))
    if rate <= 0:
        return
    devices = [fleet.device(i) for i in ids]
    seed = int(cmd.get("seed", 0))
    labelled = float(cmd.get("labelled", 1.0))
    if cmd.get("dataset"):
        parts = partitions(
            str(cmd["dataset"]),
            ids,
            total=int(cmd["total"]),
            alpha=float(cmd.get("alpha", 0.5)),
            seed=seed,
        )
        traffic = Traffic.from_partitions(devices, parts, rate=rate, labelled=labelled, seed=seed)
    else:
        with np.load(str(cmd["data"]), allow_pickle=False) as z:
            x, y = z["X"], (z["y"] if "y" in z.files else None)
        traffic = Traffic(devices, x, y, rate=rate, labelled=labelled, seed=seed)
    traffic.start()
    _traffic.append(traffic)


def partitions(
    dataset: str, ids: list[str], *, total: int, alpha: float, seed: int
) -> dict[str, tuple[Any, Any]]:
    """Each device's own rows: `dataset` split over the whole fleet of `total` devices with
    Dirichlet(alpha) label skew (`simulator.data.partition`, the same split in every worker
    process); device PREFIX-NNNN takes part NNNN (modulo the parts, past one per sample)."""
    from edgefleet.models.data import load_dataset
    from edgefleet.simulator.data import partition

    ds = load_dataset(dataset)
    k = min(total, len(ds.y))
    parts = partition(ds.x, ds.y, k, alpha=alpha, seed=seed)
    out: dict[str, tuple[Any, Any]] = {}
    for dev in ids:
        idx = parts[int(dev.rsplit("-", 1)[1]) % k]
        out[dev] = (ds.x[idx], ds.y[idx])
    return out


async def _commands(fleet: Any, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            cmd = json.loads(line)
        except ValueError as e:
            _emit({"event": "done", "id": None, "error": f"not JSON: {e}"})
            continue
        if cmd.get("cmd") == "stop":
            _emit({"event": "done", "id": cmd.get("id"), "error": None})
            break
        try:
            await _apply(fleet, cmd)
            _emit({"event": "done", "id": cmd.get("id"), "error": None})
        except (FleetError, KeyError, ValueError) as e:
            _emit({"event": "done", "id": cmd.get("id"), "error": str(e)})
    stop.set()


async def _report(fleet: Any, interval: float, stop: asyncio.Event) -> None:
    last: dict[str, Any] | None = None
    while not stop.is_set():
        snap = _snapshot(fleet)
        if snap != last:
            _emit({"event": "states", **snap})
            last = snap
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()


def _passwords(path: str | None) -> dict[str, str] | None:
    if not path:
        return None
    data: dict[str, str] = json.loads(Path(path).read_text())
    return data


async def run(spec: dict[str, Any]) -> None:
    from edgefleet.simulator.fleet import SimulatedFleet

    fleet = SimulatedFleet(
        int(spec["n"]),
        broker_url=spec["broker_url"],
        public_key_pem=spec["public_key_pem"],
        state_root=Path(spec["state_root"]),
        profile=spec.get("profile", "mixed"),
        seed=int(spec.get("seed", 0)),
        topic_prefix=spec.get("topic_prefix", "ef/v1"),
        id_prefix=spec.get("id_prefix", "sim"),
        first=int(spec.get("first", 0)),
        total=spec.get("total"),
        want_interval=float(spec.get("want_interval", 2.0)),
        telemetry_interval=float(spec.get("telemetry_interval", 10.0)),
        batch_size=int(spec.get("batch_size", 100)),
        connect_timeout=float(spec.get("connect_timeout", 120.0)),
        credentials=_passwords(spec.get("passwords_file")),
        spread=list(spec.get("spread") or ()),
        mqtt_version=str(spec.get("mqtt_version", "auto")),
        share_sessions=bool(spec.get("share_sessions", False)),
    )
    start = time.monotonic()
    async with fleet:
        _emit({"event": "ready", "startup_s": round(time.monotonic() - start, 3)})
        stop = asyncio.Event()
        await asyncio.gather(
            _commands(fleet, stop), _report(fleet, float(spec.get("interval", 0.1)), stop)
        )
        for t in _traffic:
            t.stop()
        _emit({"event": "states", **_snapshot(fleet)})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m simulator.worker SPEC_JSON\n")
        return 2
    spec = json.loads(args[0])
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if spec.get("log_file"):
        handlers = [logging.FileHandler(spec["log_file"])]
    logging.basicConfig(
        level=spec.get("log_level", "WARNING"),
        handlers=handlers,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    try:
        asyncio.run(run(spec))
    except (FleetError, TimeoutError) as e:
        _emit({"event": "error", "error": str(e)})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
