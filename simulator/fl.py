"""Many simulated devices in Flower's simulation runtime, with model-poisoning attackers.

::

    with FederatedSimulation(tmp, devices=100, alpha=0.5) as sim:
        report = sim.run([("fedavg", "none"), ("fedmedian", "signflip")], rounds=5)
        report.runs["fedmedian:signflip"].accuracy   # central holdout, last round

The dataset's training split is partitioned over the devices with Dirichlet label
skew (`simulator.data.partition`), one folder per partition, read by the same
ClientApp real devices run. The holdout never reaches a device: the ServerApp
measures each round's global model on it. Attackers (``attack_fraction`` of the
devices, chosen by seed) are a fault: operators can pit their own strategy
against sign-flipped or boosted updates.

A simulation SuperLink (loopback, private FLWR_HOME) runs while the object is
entered; each `run` is one Flower run of `simulator.fl_app` (one Ray start).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from edgefleet.models.fl import APP_DIR, EVENTS_FILE
from edgefleet.models.fl.journal import read_events
from edgefleet.models.fl.shards import partition_name
from edgefleet.protos.errors import InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

ATTACK_KEYS = """
# simulator (simulator.fl_app)
attack-scale = 10.0
attackers = ""         # partition ids that poison their updates
compare = "fedavg:none"  # STRATEGY:ATTACK,… run one after another
holdout = ""           # central holdout .npz (X, y) the ServerApp scores rounds on
"""


@dataclass(frozen=True)
class SimRun:
    label: str  # STRATEGY:ATTACK
    accuracy: list[float]  # central holdout accuracy after round 0 (start), 1, 2, …
    rounds: list[dict[str, Any]]  # the devices' own metrics per round
    seconds: float
    stamps: list[float] = field(default_factory=list)  # wall clock of each accuracy

    @property
    def seconds_per_round(self) -> float:
        """Mean wall time of a round (training, evaluation, scoring), start excluded."""
        if len(self.stamps) < 2:
            return float("nan")
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)

    @property
    def final(self) -> float:
        return self.accuracy[-1]

    def rounds_to(self, target: float) -> int | None:
        """First round whose global model reaches `target` accuracy (None: never)."""
        return next((r for r, a in enumerate(self.accuracy) if r > 0 and a >= target), None)


@dataclass
class SimReport:
    devices: int
    attackers: list[int]
    seconds: float
    runs: dict[str, SimRun] = field(default_factory=dict)


def initial_checkpoint(
    x: np.ndarray, num_classes: int, *, arch: str = "mlp", seed: int = 0
) -> bytes:
    """An untrained model whose input normalization is fitted on `x` (torch)."""
    import torch

    from edgefleet.models.arch import Normalize, build, to_checkpoint
    from edgefleet.models.checkpoint import ArchConfig, dump_checkpoint

    torch.manual_seed(seed)
    cfg = ArchConfig(arch, tuple(int(d) for d in x.shape[1:]), num_classes)
    module = build(cfg)
    for m in module.modules():
        if isinstance(m, Normalize):
            m.fit(x)
    return dump_checkpoint(to_checkpoint(cfg, module.eval()))


class FederatedSimulation:
    def __init__(
        self,
        root: Path,
        *,
        devices: int = 100,
        alpha: float = 0.5,
        dataset: str = "digits",
        seed: int = 0,
        holdout: float = 0.2,
        client_cpus: int = 1,
    ) -> None:
        from edgefleet.cloud.fl.superlink import SuperLink, SuperLinkOptions

        if devices < 2:
            raise InvalidArgument(f"simulation of {devices} devices: at least 2 needed")
        self.root = root
        self.devices = devices
        self.alpha = alpha
        self.dataset = dataset
        self.seed = seed
        self.holdout = holdout
        self.superlink = SuperLink(
            SuperLinkOptions(
                state_dir=root / "superlink",
                simulation=True,
                num_supernodes=devices,
                client_cpus=client_cpus,
            )
        )
        self.app_dir = root / "app"
        self.holdout_path = root / "holdout.npz"
        self.start_path = root / "start.npz"
        self.label_skew = 0.0
        self._runs = 0

    def __enter__(self) -> FederatedSimulation:
        self.prepare()
        self.superlink.start()
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.superlink.stop()

    def prepare(self) -> None:
        """Partitions, central holdout, starting checkpoint and the app folder."""
        from edgefleet.models.data import load_dataset, split
        from edgefleet.simulator.data import label_skew, partition, write_shards

        ds = load_dataset(self.dataset)
        train, hold = split(ds, holdout=self.holdout, seed=self.seed)
        parts = partition(train.x, train.y, self.devices, alpha=self.alpha, seed=self.seed)
        self.label_skew = label_skew(train.y, parts)
        for i, idx in enumerate(parts):
            write_shards(self.root / "data" / partition_name(i), train.x[idx], train.y[idx])
        np.savez(self.holdout_path, X=hold.x, y=hold.y)
        self.start_path.write_bytes(initial_checkpoint(train.x, ds.num_classes, seed=self.seed))
        self.app_dir.mkdir(parents=True, exist_ok=True)
        text = (APP_DIR / "pyproject.toml").read_text()
        text = text.replace(
            'serverapp = "edgefleet.models.fl.server_app:app"',
            'serverapp = "edgefleet.simulator.fl_app:server"',
        ).replace(
            'clientapp = "edgefleet.models.fl.client_app:app"',
            'clientapp = "edgefleet.simulator.fl_app:client"',
        )
        (self.app_dir / "pyproject.toml").write_text(text + ATTACK_KEYS)

    def warm_start(self, share: float, *, epochs: int = 20, lr: float = 3e-3) -> Path:
        """A registry-like starting version: the model trained centrally (as `fleet train`
        does, its defaults) on a random `share` of the training split, the data the cloud itself holds;
        the devices keep their partitions of the whole split. Written next to the cold start."""
        from edgefleet.cloud.training.train import TrainConfig, train
        from edgefleet.models.arch import to_checkpoint
        from edgefleet.models.checkpoint import dump_checkpoint
        from edgefleet.models.data import load_dataset, split

        if not 0.0 < share <= 1.0:
            raise InvalidArgument(f"warm-start share {share}: expected more than 0, at most 1")
        tr, _ = split(load_dataset(self.dataset), holdout=self.holdout, seed=self.seed)
        rng = np.random.default_rng(self.seed + 2)
        idx = np.sort(rng.choice(len(tr.y), size=max(1, round(share * len(tr.y))), replace=False))
        r = train(tr.subset(idx), TrainConfig(arch="mlp", epochs=epochs, lr=lr, seed=self.seed))
        path = self.root / f"warm-{share:g}.npz"
        path.write_bytes(dump_checkpoint(to_checkpoint(r.arch_config, r.module.eval())))
        return path

    def attackers(self, fraction: float) -> list[int]:
        if not 0.0 <= fraction < 0.5:
            raise InvalidArgument(f"attack fraction {fraction}: expected 0 to under 0.5")
        k = round(fraction * self.devices)
        rng = np.random.default_rng(self.seed + 1)
        return sorted(int(i) for i in rng.choice(self.devices, size=k, replace=False))

    def run(
        self,
        compare: Sequence[tuple[str, str]],
        *,
        rounds: int = 5,
        attack_fraction: float = 0.2,
        attack_scale: float = 10.0,
        local_epochs: int = 1,
        lr: float = 3e-3,
        batch_size: int = 32,
        fraction: float = 1.0,
        byzantine: float = 0.2,
        checkpoint: Path | None = None,
        timeout: float = 900.0,
        extra: Mapping[str, Any] | None = None,
    ) -> SimReport:
        """One Flower run trying each (strategy, attack) in turn from the same start.

        `extra`: more run config keys (app/pyproject.toml), e.g. ``proximal-mu``.
        """
        self._runs += 1
        out = self.root / "runs" / f"run-{self._runs}"
        attackers = self.attackers(attack_fraction)
        labels = [f"{s}:{a}" for s, a in compare]
        rc = {
            "checkpoint": str(checkpoint or self.start_path),
            "output-dir": str(out),
            "num-rounds": rounds,
            "fraction": fraction,
            "min-clients": 2,
            "local-epochs": local_epochs,
            "lr": lr,
            "batch-size": batch_size,
            "byzantine": byzantine,
            "round-timeout": 300.0,
            "join-timeout": 120.0,
            "seed": self.seed,
            "data-root": str(self.root / "data"),
            "attack-scale": attack_scale,
            "attackers": ",".join(str(a) for a in attackers),
            "compare": ",".join(labels),
            "holdout": str(self.holdout_path),
            # in memory, a pull is free: Flower's own simulation grid pulls every 0.1 s
            "pull-interval": 0.1,
            **(extra or {}),
        }
        t0 = time.monotonic()
        flower_id = self.superlink.submit(self.app_dir, rc)
        events = self._wait(out / EVENTS_FILE, flower_id, timeout)
        report = SimReport(self.devices, attackers, time.monotonic() - t0)
        for label in labels:
            acc = sorted(
                (e for e in events if e.get("event") == "central" and e.get("label") == label),
                key=lambda e: int(e["round"]),
            )
            rnds = [e for e in events if e.get("event") == "round" and e.get("label") == label]
            res = next(e for e in events if e.get("event") == "result" and e["label"] == label)
            report.runs[label] = SimRun(
                label,
                [float(e["accuracy"]) for e in acc],
                rnds,
                float(res["seconds"]),
                [float(e["t"]) for e in acc],
            )
        logger.info(
            "simulation %s: %s", flower_id, json.dumps({k: v.final for k, v in report.runs.items()})
        )
        return report

    def _wait(self, journal: Path, flower_id: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        events: list[dict[str, Any]] = []
        offset = 0
        next_status = time.monotonic() + 5
        while time.monotonic() < deadline:
            new, offset = read_events(journal, offset)
            events += new
            for e in new:
                if e.get("event") == "failed":
                    raise Unavailable(f"simulation run {flower_id}: {e.get('reason')}")
                if e.get("event") == "done":
                    return events
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + 5
                status = self.superlink.run_status(flower_id)
                if status.startswith("finished") and not read_events(journal, offset)[0]:
                    raise Unavailable(
                        f"simulation run {flower_id} ended ({status}) without a result; "
                        f"its log ends:\n{self.superlink.run_log(flower_id)}"
                    )
            time.sleep(0.2)
        self.superlink.stop_run(flower_id)
        raise Unavailable(f"simulation run {flower_id} did not finish within {timeout:g}s")
