"""The ClientApp's numpy MLP trainer against the torch one (`models/fl/task.py`), and the
ClientApp handling messages without importing torch (a fresh process, as Flower runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.models.checkpoint import ArchConfig, Checkpoint, dump_checkpoint, load_checkpoint
from edgefleet.models.fl import numpy_task as nt
from edgefleet.protos.errors import InvalidArgument, Unavailable


@pytest.fixture(scope="module")
def digits() -> tuple[bytes, np.ndarray, np.ndarray]:
    """A checkpoint after one epoch of central training (fitted buffers), and the data."""
    from edgefleet.cloud.training.train import TrainConfig, train
    from edgefleet.models.arch import to_checkpoint
    from edgefleet.models.data import load_dataset

    ds = load_dataset("digits")
    r = train(ds.subset(np.arange(300)), TrainConfig(arch="mlp", epochs=1, seed=3))
    return dump_checkpoint(to_checkpoint(r.arch_config, r.module)), ds.x, ds.y


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_numpy_fit_matches_torch_fit(
    digits: tuple[bytes, np.ndarray, np.ndarray], mu: float
) -> None:
    from edgefleet.models.fl import task

    base, x, y = digits
    cfg = nt.FitConfig(epochs=2, lr=5e-3, batch_size=16, seed=11, proximal_mu=mu)
    module, model = task.module_from(base), nt.mlp_from(base)
    torch_loss, torch_acc = task.fit(module, x[:250], y[:250], cfg)
    np_loss, np_acc = nt.fit(model, x[:250], y[:250], cfg)
    assert np_loss == pytest.approx(torch_loss, rel=1e-5)
    assert np_acc == torch_acc
    want = task.trainable(module)
    got = model.trainable()
    assert list(got) == list(want)  # same names, same order (what the reply carries)
    start = load_checkpoint(base).arrays
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
        assert not np.array_equal(got[k], start[k])  # it did train


def test_the_proximal_term_pulls_toward_the_global_model(
    digits: tuple[bytes, np.ndarray, np.ndarray],
) -> None:
    base, x, y = digits
    start = nt.mlp_from(base).trainable()

    def drift(mu: float) -> float:
        model = nt.mlp_from(base)
        nt.fit(model, x[:250], y[:250], nt.FitConfig(epochs=3, lr=1e-2, proximal_mu=mu))
        return sum(float(((model.params[k] - v) ** 2).sum()) for k, v in start.items())

    assert drift(5.0) < 0.5 * drift(0.0)


def test_numpy_evaluate_matches_torch(digits: tuple[bytes, np.ndarray, np.ndarray]) -> None:
    from edgefleet.models.fl import task

    base, x, y = digits
    params = {k: v + 0.01 for k, v in nt.mlp_from(base).trainable().items()}
    torch_loss, torch_acc = task.evaluate(task.module_from(base, params), x[300:700], y[300:700])
    np_loss, np_acc = nt.evaluate(nt.mlp_from(base, params), x[300:700], y[300:700])
    assert np_loss == pytest.approx(torch_loss, rel=1e-5)
    assert np_acc == pytest.approx(torch_acc, abs=1e-6)


def test_checkpoints_that_do_not_fit_are_refused(
    digits: tuple[bytes, np.ndarray, np.ndarray],
) -> None:
    base, x, _ = digits
    ckpt = load_checkpoint(base)
    with pytest.raises(InvalidArgument, match="not in the 'mlp' checkpoint"):
        nt.mlp_from(base, {"head.weight": np.zeros(2, np.float32)})
    with pytest.raises(InvalidArgument, match=r"'body.0.weight' has shape \(3, 3\)"):
        nt.mlp_from(base, {"body.0.weight": np.zeros((3, 3), np.float32)})
    short = {k: v for k, v in ckpt.arrays.items() if k != "norm.std"}
    with pytest.raises(InvalidArgument, match=r"missing \['norm.std'\]"):
        nt.NumpyMLP(ckpt.config, short)
    cnn = ArchConfig("cnn", (8, 8), 10)
    with pytest.raises(Unavailable, match="arch 'cnn' trains with PyTorch") as e:
        nt.NumpyMLP(cnn, ckpt.arrays)
    assert nt.TORCH_CPU in str(e.value)
    with pytest.raises(InvalidArgument, match="no local training samples"):
        nt.fit(nt.mlp_from(base), x[:0], np.zeros(0, np.int64), nt.FitConfig())


#: handles train (and evaluate) messages like a fresh flwr-clientapp process, then reports
#: whether torch got imported; argv: checkpoint, data dir, out file, "no-torch" or ""
_HANDLE = """
import json, sys
import numpy as np
if sys.argv[4] == "no-torch":
    sys.modules["torch"] = None  # how Python marks a module not importable
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from edgefleet.models.checkpoint import load_checkpoint
from edgefleet.models.fl import client_app

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1  # as Flower sets them

base = open(sys.argv[1], "rb").read()
arrays = {k: v for k, v in load_checkpoint(base).arrays.items() if not k.startswith("norm.")}
ctx = Context(7, 12345, {"device-id": "dev-a", "data-dir": sys.argv[2]}, RecordDict(), {})
out = {}
for kind, extra in (("train", {"evaluate-on-train": True}), ("evaluate", {})):
    cfg = {"base": base, "seed": 1, "server-round": 2, "local-epochs": 2, "lr": 5e-3,
           "batch-size": 8, "proximal-mu": 0.1, **extra}
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in
                          arrays.items()}), "config": ConfigRecord(cfg)})
    msg = Message(content, dst_node_id=12345, message_type=getattr(MessageType, kind.upper()))
    reply = getattr(client_app, kind)(msg, ctx)
    if reply.has_error():
        out[kind] = {"error": reply.error.reason}
        continue
    c = reply.content
    out[kind] = {"metrics": dict(c.metric_records["metrics"])}
    if "arrays" in c.array_records:
        np.savez(sys.argv[3] + ".npz", **{k: v.numpy() for k, v in c.array_records["arrays"].items()})
out["torch"] = "torch" in sys.modules and sys.modules["torch"] is not None
print(json.dumps(out))
"""


def _handle(tmp_path: Path, ckpt: bytes, data: Path, *, no_torch: bool = False) -> dict:  # type: ignore[type-arg]
    (tmp_path / "c.npz").write_bytes(ckpt)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _HANDLE,
            str(tmp_path / "c.npz"),
            str(data),
            str(tmp_path / "r"),
            "no-torch" if no_torch else "",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_client_app_trains_an_mlp_without_importing_torch(
    tmp_path: Path, digits: tuple[bytes, np.ndarray, np.ndarray]
) -> None:
    from edgefleet.models.fl import task
    from edgefleet.models.fl.shards import local_split
    from edgefleet.simulator.data import write_shards

    base, x, y = digits
    write_shards(tmp_path / "data", x[:120], y[:120])
    out = _handle(tmp_path, base, tmp_path / "data")
    assert out["torch"] is False
    train, ev = out["train"]["metrics"], out["evaluate"]["metrics"]
    assert train["num-examples"] == 96 and ev["num-examples"] == 24
    # the same local work done with torch: the reply's arrays and metrics agree
    tr, ho = local_split(120, seed=1)
    module = task.module_from(base)
    eloss, eacc = task.evaluate(module, x[:120][ho], y[:120][ho])
    cfg = nt.FitConfig(
        epochs=2, lr=5e-3, batch_size=8, seed=1 + 2 + 12345 % 10_000, proximal_mu=0.1
    )
    loss, acc = task.fit(module, x[:120][tr], y[:120][tr], cfg)
    assert train["eval-loss"] == pytest.approx(eloss, rel=1e-5)
    assert train["eval-accuracy"] == pytest.approx(eacc, abs=1e-6)
    assert ev["eval-loss"] == pytest.approx(eloss, rel=1e-5)  # evaluate: the received model
    assert train["train-loss"] == pytest.approx(loss, rel=1e-5)
    assert train["train-accuracy"] == pytest.approx(acc, abs=1e-6)
    with np.load(tmp_path / "r.npz") as z:
        want = task.trainable(module)
        assert sorted(z.files) == sorted(want)
        for k, v in want.items():
            np.testing.assert_allclose(z[k], v, rtol=0, atol=1e-6, err_msg=k)


def test_a_cnn_message_without_torch_is_answered_with_how_to_install_it(
    tmp_path: Path,
) -> None:
    from edgefleet.simulator.data import write_shards
    from edgefleet.simulator.fl import initial_checkpoint

    x = np.random.default_rng(0).random((20, 8, 8), dtype=np.float32)
    y = np.arange(20) % 4
    write_shards(tmp_path / "data", x, y)
    cnn = initial_checkpoint(x, 4, arch="cnn")
    assert load_checkpoint(cnn).config.arch == "cnn"
    out = _handle(tmp_path, cnn, tmp_path / "data", no_torch=True)
    for kind in ("train", "evaluate"):
        reason = out[kind]["error"]
        assert reason.startswith("dev-a: Unavailable: arch 'cnn' trains with PyTorch"), reason
        assert nt.TORCH_CPU in reason
    small = ArchConfig("mlp", (8, 8), 4, {"hidden": [5]})
    rng = np.random.default_rng(1)
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in nt.mlp_shapes(small).items()}
    mlp = Checkpoint(small, {**arrays, "norm.std": np.ones(64, np.float32)})
    ok = _handle(tmp_path, dump_checkpoint(mlp), tmp_path / "data", no_torch=True)
    assert ok["train"]["metrics"]["num-examples"] == 16  # an MLP trains without torch
