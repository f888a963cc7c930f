"""Federated-learning pieces that need no processes: participants, features, options,
the attacker's arithmetic, checkpoints in and out of a round, the journal."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cloud.devices import Device
from edgefleet.cloud.devices.values import Accelerator, Capabilities
from edgefleet.cloud.fl.canary import CanaryPlan
from edgefleet.cloud.fl.federation import RunRequest
from edgefleet.cloud.fl.selection import select_participants
from edgefleet.cloud.fl.store import FlNode
from edgefleet.cloud.registry import ModelRef
from edgefleet.models.fl.journal import Journal, read_events
from edgefleet.models.fl.shards import count_samples, data_dir_of, local_split
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.flower import fl_features, parse_fl_features


def _device(device_id: str, *, online: bool = True, features: list[str] | None = None) -> Device:
    return Device(
        device_id=device_id,
        group="",
        tags={},
        enrolled_at=datetime.now(UTC),
        online=online,
        last_seen=None,
        agent_version="0.1.0",
        capabilities=(
            Capabilities(
                "x86_64", ("onnxruntime",), (), Accelerator.CPU, 512, features=tuple(features)
            )
            if features is not None
            else None
        ),
        active=None,
        reported=None,
        desired_generation=0,
        rollout_id="",
    )


def test_fl_features_round_trip() -> None:
    assert parse_fl_features(fl_features(ready=True, samples=120)) == {
        "ready": True,
        "reason": "",
        "samples": 120,
        "torch": True,
    }
    off = parse_fl_features(fl_features(ready=False, reason="no data", samples=0, torch=False))
    assert off == {"ready": False, "reason": "no data", "samples": 0, "torch": False}
    assert parse_fl_features(["something-else"]) is None


def test_participants_are_chosen_with_a_reason_for_each_skip() -> None:
    now = datetime.now(UTC)
    nodes = {d: FlNode(d, "ecdsa-sha2-nistp384 AAAA", i + 1, now) for i, d in enumerate("abcdf")}
    nodes["e"] = FlNode("e", "ecdsa-sha2-nistp384 AAAA", None, now)
    devices = [
        _device("a", features=fl_features(ready=True, samples=100)),
        _device("b", online=False, features=fl_features(ready=True, samples=100)),
        _device("c", features=[]),
        _device("d", features=fl_features(ready=True, samples=5)),
        _device("e", features=fl_features(ready=True, samples=100)),
        _device("f", features=fl_features(ready=False, reason="no shard-*.npz")),
        _device("g", features=fl_features(ready=True, samples=100)),
    ]
    sel = select_participants(devices, nodes, min_samples=20)
    assert sel.chosen == {"a": 1}
    assert sel.skipped["b"] == "offline"
    assert "edgefleet-agent[fl]" in sel.skipped["c"]
    assert "5 local samples" in sel.skipped["d"]
    assert "not registered with the SuperLink" in sel.skipped["e"]
    assert "no shard-*.npz" in sel.skipped["f"]
    assert "fleet devices enroll g --fl" in sel.skipped["g"]


def test_a_device_without_torch_takes_part_in_mlp_runs_only() -> None:
    """The ClientApp trains `mlp` checkpoints in numpy; a CNN run needs torch on the device."""
    from edgefleet.models.fl.numpy_task import TORCH_CPU

    now = datetime.now(UTC)
    nodes = {d: FlNode(d, "ecdsa-sha2-nistp384 AAAA", i + 1, now) for i, d in enumerate("ab")}
    devices = [
        _device("a", features=fl_features(ready=True, samples=100)),
        _device("b", features=fl_features(ready=True, samples=100, torch=False)),
    ]
    assert select_participants(devices, nodes, min_samples=20).chosen == {"a": 1, "b": 2}
    cnn = select_participants(devices, nodes, min_samples=20, arch="cnn")
    assert cnn.chosen == {"a": 1}
    assert cnn.skipped["b"] == (
        f"PyTorch missing on the device; arch 'cnn' trains with it: {TORCH_CPU}"
    )


def test_run_options_are_checked_before_anything_starts() -> None:
    ok = RunRequest(ref=ModelRef("digits", 1), then_deploy="canary=10%")
    ok.check()
    with pytest.raises(InvalidArgument, match="'fedsgd' unknown; accepted: fedavg"):
        RunRequest(ref=ok.ref, strategy="fedsgd").check()
    with pytest.raises(InvalidArgument, match="--dp-noise 1.0 needs --dp-clip"):
        RunRequest(ref=ok.ref, dp_noise=1.0).check()
    with pytest.raises(InvalidArgument, match="--fraction 0"):
        RunRequest(ref=ok.ref, fraction=0).check()
    assert RunRequest(ref=ok.ref, dp_clip=1.0, dp_noise=0.5).dp == {"clip": 1.0, "noise": 0.5}


def test_canary_plan_becomes_a_rollout_policy() -> None:
    plan = CanaryPlan.parse("canary=10%")
    assert plan.fraction == pytest.approx(0.1) and str(plan) == "canary=10%"
    assert plan.policy().canary == pytest.approx(0.1) and plan.policy().waves[-1] == 1.0
    quick = CanaryPlan.parse("canary=0.25,bake=30s")
    assert quick.policy().bake_s == 30.0 and quick.policy().canary == pytest.approx(0.25)
    for bad, msg in (
        ("waves=3", "'waves=3' not understood"),
        ("bake=5s", "no canary share"),
        ("canary=0%", "--then-deploy canary"),
        ("canary=x", "not a percentage"),
        ("canary=10%,bake=soon", "not a duration"),
    ):
        with pytest.raises(InvalidArgument, match=msg):
            CanaryPlan.parse(bad)


def test_attacker_updates_point_the_other_way_and_farther() -> None:
    pytest.importorskip("flwr")
    from edgefleet.simulator.fl_app import poisoned

    sent = {"w": np.zeros(3, np.float32)}
    trained = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    assert np.allclose(poisoned(sent, trained, "signflip", 10.0)["w"], [-10, 20, -5])
    assert np.allclose(poisoned(sent, trained, "boost", 10.0)["w"], [10, -20, 5])
    assert poisoned(sent, trained, "none", 10.0) is trained
    with pytest.raises(InvalidArgument, match="accepted: none, signflip, boost"):
        poisoned(sent, trained, "noise", 1.0)


def test_participants_text_maps_nodes_to_devices() -> None:
    pytest.importorskip("flwr")
    from edgefleet.models.fl.server_app import parse_participants

    assert parse_participants("cam-1=18446744073709551615,cam-2=7") == {
        18446744073709551615: "cam-1",
        7: "cam-2",
    }
    with pytest.raises(InvalidArgument, match="expected DEVICE=NODE_ID"):
        parse_participants("cam-1")


def test_round_weights_keep_the_buffers_of_the_start(tmp_path: Path) -> None:
    from edgefleet.cloud.training.train import TrainConfig, train
    from edgefleet.models.arch import to_checkpoint
    from edgefleet.models.checkpoint import dump_checkpoint, load_checkpoint
    from edgefleet.models.data import load_dataset
    from edgefleet.models.fl.task import (
        FitConfig,
        evaluate,
        fit,
        merged_checkpoint,
        module_from,
        trainable,
    )

    ds = load_dataset("digits")
    r = train(ds.subset(np.arange(300)), TrainConfig(arch="mlp", epochs=1))
    base = dump_checkpoint(to_checkpoint(r.arch_config, r.module))
    module = module_from(base)
    params = trainable(module)
    assert "norm.mean" not in params and "body.0.weight" in params
    before = evaluate(module, ds.x[300:600], ds.y[300:600])[1]
    fit(module, ds.x[:300], ds.y[:300], FitConfig(epochs=3, lr=5e-3))
    after = evaluate(module, ds.x[300:600], ds.y[300:600])[1]
    assert after > before
    merged = load_checkpoint(merged_checkpoint(base, trainable(module)))
    start = load_checkpoint(base)
    assert np.array_equal(merged.arrays["norm.std"], start.arrays["norm.std"])
    assert not np.array_equal(merged.arrays["body.0.weight"], start.arrays["body.0.weight"])
    with pytest.raises(InvalidArgument, match="not in the 'mlp' checkpoint"):
        module_from(base, {"head.weight": np.zeros(2, np.float32)})


def test_local_data_split_and_location(tmp_path: Path) -> None:
    from edgefleet.simulator.data import write_shards

    write_shards(tmp_path / "d", np.zeros((50, 4), np.float32), np.arange(50) % 3)
    assert count_samples(tmp_path / "d") == 50
    tr, ho = local_split(50, seed=1)
    assert len(ho) == 10 and len(tr) == 40 and not set(tr) & set(ho)
    assert np.array_equal(local_split(50, seed=1)[1], ho)  # the same every round
    assert data_dir_of({"data-dir": str(tmp_path / "d")}, {}) == tmp_path / "d"
    assert data_dir_of({"partition-id": 3}, {"data-root": "/r"}) == Path("/r/partition-0003")
    with pytest.raises(InvalidArgument, match="no data-dir"):
        data_dir_of({}, {})


def test_journal_reads_only_complete_lines(tmp_path: Path) -> None:
    j = Journal(tmp_path / "events.jsonl")
    j.write("round", round=1)
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write('{"event": "round", "ro')  # a line still being written
    events, offset = read_events(tmp_path / "events.jsonl")
    assert [(e["event"], e["round"]) for e in events] == [("round", 1)]
    assert abs(events[0]["t"] - time.time()) < 60
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write('und": 2}\n')
    more, _ = read_events(tmp_path / "events.jsonl", offset)
    assert more == [{"event": "round", "round": 2}]


def test_server_momentum_and_adam_take_their_run_config() -> None:
    from flwr.serverapp.strategy import FedAdam, FedAvgM

    from edgefleet.models.fl.strategies import build_strategy

    m = build_strategy({"strategy": "fedavgm", "server-lr": 0.5, "server-momentum": 0.7}, 4)
    assert isinstance(m, FedAvgM)
    assert (m.server_learning_rate, m.server_momentum) == (0.5, 0.7)
    a = build_strategy({"strategy": "fedadam", "server-eta": 0.02, "lr": 0.01}, 4)
    assert isinstance(a, FedAdam)
    assert (a.eta, a.eta_l) == (0.02, 0.01)
    RunRequest(ModelRef("m", 1), strategy="fedavgm").check()


def test_fleet_grid_pulls_until_every_reply_or_the_deadline(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from edgefleet.models.fl.grid import FleetGrid

    now = [0.0]
    pulls: list[float] = []

    def reply(msg_id: str) -> SimpleNamespace:  # what the loop reads of a reply Message
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=msg_id))

    class Link:  # the two Grid calls used: replies for "a" now, "b" at t=1.0, "c" never
        def push_messages(self, messages: object) -> list[str]:
            return ["a", "b", "c"]

        def pull_messages(self, message_ids: object) -> list[SimpleNamespace]:
            pulls.append(now[0])
            ids = set(message_ids)  # type: ignore[call-overload]
            ready = {"a"} | ({"b"} if now[0] >= 1.0 else set())
            return [reply(i) for i in sorted(ids & ready)]

    def sleep(s: float) -> None:
        now[0] += s

    grid = FleetGrid(
        Link(),  # type: ignore[arg-type]
        Journal(tmp_path / "events.jsonl"),
        participants={},
        min_clients=1,
        join_timeout=1.0,
        pull_interval=0.25,
        clock=lambda: now[0],
        sleep=sleep,
    )
    got = grid._exchange([], timeout=2.0)
    assert sorted(m.metadata.reply_to_message_id for m in got) == ["a", "b"]
    assert pulls[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]  # every pull_interval, not Flower's 3 s
    assert now[0] >= 2.0  # "c" never answered: it gave up at the deadline


def test_on_train_evaluation_is_journaled_without_evaluate_messages(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from flwr.app import MessageType

    from edgefleet.models.fl.grid import FleetGrid
    from edgefleet.models.fl.strategies import build_strategy

    assert build_strategy({"evaluate": "on-train"}, 3).fraction_evaluate == 0.0  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        build_strategy({"evaluate": "later"}, 3)

    def reply(node: int, msg_id: str, acc: float) -> SimpleNamespace:
        metrics = {"train-loss": 0.5, "eval-accuracy": acc, "num-examples": 10}
        return SimpleNamespace(
            metadata=SimpleNamespace(reply_to_message_id=msg_id, src_node_id=node),
            content=SimpleNamespace(metric_records={"metrics": metrics}),
            has_error=lambda: False,
        )

    class Link:
        def push_messages(self, messages: object) -> list[str]:
            return ["a", "b"]

        def pull_messages(self, message_ids: object) -> list[SimpleNamespace]:
            return [reply(1, "a", 0.6), reply(2, "b", 0.8)]

    sent = [
        SimpleNamespace(
            metadata=SimpleNamespace(message_type=MessageType.TRAIN, dst_node_id=n),
            content=SimpleNamespace(config_records={"config": {"server-round": 1}}),
        )
        for n in (1, 2)
    ]
    journal = Journal(tmp_path / "events.jsonl")
    grid = FleetGrid(
        Link(),  # type: ignore[arg-type]
        journal,
        participants={1: "dev-1", 2: "dev-2"},
        min_clients=2,
        join_timeout=1.0,
    )
    grid.devices = {1: "dev-1", 2: "dev-2"}
    grid.send_and_receive(sent, timeout=5.0)  # type: ignore[arg-type]
    assert grid.send_and_receive([], timeout=5.0) == []  # the strategy's empty evaluate stage
    (rnd,) = [e for e in read_events(tmp_path / "events.jsonl", 0)[0] if e["event"] == "round"]
    assert rnd["round"] == 1 and rnd["evaluated"] == ["dev-1", "dev-2"]
    assert rnd["evaluate"]["eval-accuracy"] == pytest.approx(0.7)  # weighted by num-examples
    assert "eval-accuracy" not in rnd["train"] and rnd["train"]["train-loss"] == 0.5


def test_a_device_without_torch_is_ready_and_says_it_has_no_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """edgefleet-agent[fl] brings Flower but not PyTorch: the ClientApp trains `mlp`
    checkpoints without it, so such a device is ready and states "fl-no-torch" (the
    coordinator leaves it out of runs whose architecture needs torch)."""
    import sys

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from edgefleet.agent.config import AgentSettings
    from edgefleet.agent.fl import fl_capability
    from edgefleet.protos.flower import flower_available

    if not flower_available():
        pytest.skip("needs Flower (edgefleet[fl])")
    pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "shard-0000.npz", X=np.zeros((10, 64), np.float32), y=np.arange(10) % 10)
    settings = AgentSettings(
        device_id="cam-1",
        state_dir=tmp_path,
        broker_url="mqtt://127.0.0.1:1",  # never started
        public_key_pem=pem.decode(),
        listen="",
        fl_superlink="127.0.0.1:1",
        fl_data_dir=data,
    )
    full = {"ready": True, "reason": "", "samples": 10, "torch": True}
    assert fl_capability(settings) == full

    monkeypatch.setitem(sys.modules, "torch", None)  # how Python marks a module not importable
    no_torch = fl_capability(settings)
    assert no_torch == {**full, "torch": False}
    features = fl_features(**no_torch)
    assert "fl" in features and "fl-no-torch" in features
    assert parse_fl_features(features) == no_torch


def test_a_long_fl_off_reason_is_cut_to_what_the_coordinator_takes() -> None:
    """A reason naming a deep data directory must not make the coordinator refuse the
    device's whole status (capability entries are bounded at its boundary)."""
    from edgefleet.cloud.inbound import MAX_NAME
    from edgefleet.protos.flower import MAX_FEATURE

    assert MAX_FEATURE == MAX_NAME
    deep = "/var/lib/edgefleet/" + "d" * 300
    features = fl_features(ready=False, reason=f"no shard-*.npz training data in {deep}")
    assert max(len(f) for f in features) == MAX_FEATURE
    parsed = parse_fl_features(features)
    assert parsed is not None and parsed["ready"] is False
    assert str(parsed["reason"]).startswith("no shard-*.npz training data in /var/lib/edgefleet/")
    assert str(parsed["reason"]).endswith("…")
