"""The model pipeline through the `fleet` CLI, as an operator types it.

Real training (torch), real exports, every variant evaluated in its real runtime
(ONNX Runtime, LiteRT), SQLite registry and file:// store under a temp FLEET_HOME.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cloud.cli.main import run
from tests.conftest import Cli

ALL_VARIANTS = ("fp32", "int8", "fp16", "tflite-fp32", "tflite-int8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLEET_HOME holding digits:1 (cnn) with every default variant."""
    home = tmp_path_factory.mktemp("trained") / "home"
    h = ["--home", str(home)]
    assert run([*h, "init"]) == 0
    assert run([*h, "train", "--model", "digits", "--arch", "cnn", "--epochs", "8"]) == 0
    assert run([*h, "quantize", "digits:1"]) == 0
    return home


def show_json(cli: Cli, home: Path, ref: str) -> dict:  # type: ignore[type-arg]
    r = cli("--home", str(home), "models", "show", ref, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)  # type: ignore[no-any-return]


def versions_count(cli: Cli, home: Path) -> int:
    r = cli("--home", str(home), "models", "ls", "--json")
    assert r.code == 0, r.err
    return sum(m["versions"] for m in json.loads(r.out))


def assert_one_error_line(r: object, code: int = 1) -> str:
    assert r.code == code, (r.out, r.err)  # type: ignore[attr-defined]
    lines = [ln for ln in r.err.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error ("), r.err  # type: ignore[attr-defined]
    return lines[0]


def test_show_prints_a_table_of_every_variant(cli: Cli, trained: Path) -> None:
    r = cli("--home", str(trained), "models", "show", "digits:1")
    assert r.code == 0, r.err
    for header in ("VARIANT", "SIZE", "ACCURACY", "P50 B1", "P50 B64"):
        assert header in r.out
    for name in ALL_VARIANTS:
        assert f"\n{name} " in r.out


def test_variants_are_measured_in_their_runtimes_and_gated(cli: Cli, trained: Path) -> None:
    v = show_json(cli, trained, "digits:1")
    assert v["lineage"]["source"] == "train" and v["lineage"]["dataset_name"] == "digits"
    assert (
        len(v["lineage"]["dataset_digest"]) == 64 and v["lineage"]["training_config"]["epochs"] == 8
    )
    by = {x["name"]: x for x in v["variants"]}
    assert set(by) == set(ALL_VARIANTS)
    assert by["tflite-int8"]["runtime"] == by["tflite-fp32"]["runtime"] == "litert"
    fp32 = by["fp32"]
    assert fp32["accuracy"] > 0.9
    assert abs(fp32["accuracy"] - v["metrics"]["holdout_accuracy"]) < 0.01  # ONNX == torch
    for name in ("int8", "tflite-int8"):
        assert by[name]["size"] < fp32["size"] / 2.5, (name, by[name]["size"], fp32["size"])
        assert by[name]["quantization"]["activations"] == "int8"
    for x in by.values():
        assert x["latency_ms"]["b1"] > 0 and x["latency_ms"]["b64"] > x["latency_ms"]["b1"]
        drop = (fp32["accuracy"] - x["accuracy"]) * 100
        assert x["deployable"] == (drop <= 1.0), x
        assert len(x["sha256"]) == 64


def test_max_drop_gate_marks_but_keeps(cli: Cli, tmp_path: Path) -> None:
    h = ["--home", str(tmp_path / "h")]
    assert cli(*h, "init").code == 0
    assert cli(*h, "train", "--model", "m", "--arch", "mlp", "--epochs", "3").code == 0
    r = cli(*h, "quantize", "m:1", "--variants", "int8,fp16", "--max-drop", "0")
    assert r.code == 0, r.err
    v = show_json(cli, tmp_path / "h", "m:1")
    fp32 = next(x for x in v["variants"] if x["name"] == "fp32")["accuracy"]
    for x in v["variants"]:
        if x["name"] != "fp32":
            assert x["deployable"] == (x["accuracy"] >= fp32)
            if not x["deployable"]:
                assert "points below fp32" in x["reason"] and "max drop 0" in x["reason"]
    again = cli(*h, "quantize", "m:1", "--variants", "int8")
    assert "already has variant(s) int8" in assert_one_error_line(again)
    dyn = cli(*h, "quantize", "m:1", "--variants", "int8-dynamic")
    assert dyn.code == 0, dyn.err  # the MLP has no convolutions: allowed


def test_dynamic_int8_refused_for_convolutions(cli: Cli, trained: Path) -> None:
    r = cli("--home", str(trained), "quantize", "digits:1", "--variants", "int8-dynamic")
    assert "int8-dynamic refused: the model has Conv" in assert_one_error_line(r)
    assert "int8-dynamic" not in {
        x["name"] for x in show_json(cli, trained, "digits:1")["variants"]
    }


def test_verify_export_and_agent_verify(cli: Cli, trained: Path, tmp_path: Path) -> None:
    r = cli("--home", str(trained), "models", "verify", "digits:1")
    assert r.code == 0, r.err
    assert r.out.count(" ok ") >= len(ALL_VARIANTS) and "FAILED" not in r.out
    r = cli("--home", str(trained), "models", "verify", "digits:1", "--json")
    assert r.code == 0, r.err
    shas = {v["name"]: v["sha256"] for v in show_json(cli, trained, "digits:1")["variants"]}
    details = {x["variant"]: x["detail"] for x in json.loads(r.out)["results"]}
    for name, sha in shas.items():  # full hashes, never shortened
        assert len(sha) == 64 and f"sha256 {sha}," in details[name]
    out = tmp_path / "export"
    r = cli("--home", str(trained), "models", "export", "digits:1", "--out", str(out))
    assert r.code == 0, r.err
    model = out / "digits-1-tflite-int8.tflite"
    manifest = out / "digits-1-tflite-int8.manifest"
    assert model.exists() and manifest.exists() and (out / "digits-1-weights.npz").exists()
    agent = [
        sys.executable,
        "-m",
        "edgefleet.agent.cli",
        "verify",
        str(model),
        "--manifest",
        str(manifest),
        "--public-key",
        str(trained / "keys" / "signing.pub"),
    ]
    ok = subprocess.run(agent, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "signature ok, sha256 ok" in ok.stdout and "self-test ok" in ok.stdout
    wrong = subprocess.run(
        [*agent[:4], str(out / "digits-1-int8.onnx"), *agent[5:]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 1 and "error (data-loss)" in wrong.stderr


def test_tampered_blob_and_manifest_fail_verification(cli: Cli, tmp_path: Path) -> None:
    home = tmp_path / "h"
    h = ["--home", str(home)]
    assert cli(*h, "init").code == 0
    assert cli(*h, "train", "--model", "m", "--arch", "mlp", "--epochs", "2").code == 0
    assert cli(*h, "quantize", "m:1", "--variants", "int8").code == 0
    v = show_json(cli, home, "m:1")
    int8 = next(x for x in v["variants"] if x["name"] == "int8")
    blob = home / "artifacts" / int8["sha256"][:2] / int8["sha256"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x55
    blob.write_bytes(bytes(data))
    r = cli(*h, "models", "verify", "m:1")
    assert r.code == 1
    rows = {ln.split()[0]: ln for ln in r.out.splitlines() if ln.strip()}
    assert "FAILED" in rows["int8"] and "data-loss" in rows["int8"]
    assert " ok " in rows["fp32"]
    # a served blob is checked too: export refuses to write the corrupted bytes
    e = cli(*h, "models", "export", "m:1", "--variant", "int8", "--out", str(tmp_path / "x"))
    assert "corrupted or tampered" in assert_one_error_line(e)
    assert not (tmp_path / "x" / "m-1-int8.onnx").exists()
    # a manifest altered in the database no longer verifies against the signing key
    with sqlite3.connect(home / "registry.db") as db:
        (signed,) = db.execute("select signed_manifest from variants where name='fp32'").fetchone()
        forged = bytearray(signed)
        forged[20] ^= 0x01
        db.execute("update variants set signed_manifest=? where name='fp32'", (bytes(forged),))
    r = cli(*h, "models", "verify", "m:1")
    rows = {ln.split()[0]: ln for ln in r.out.splitlines() if ln.strip()}
    assert r.code == 1 and "FAILED" in rows["fp32"]


def test_bad_inputs_give_one_line_and_change_nothing(
    cli: Cli, trained: Path, tmp_path: Path
) -> None:
    h = ["--home", str(trained)]
    before = versions_count(cli, trained)
    line = assert_one_error_line(cli(*h, "models", "show", "digits:99"))
    assert "no version 99; versions: 1" in line
    assert "models: digits" in assert_one_error_line(cli(*h, "models", "show", "nope:1"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert "not a readable .npz" in assert_one_error_line(
        cli(*h, "train", "--model", "digits", "--data", str(bad))
    )
    flat = tmp_path / "flat.npz"
    rng = np.random.default_rng(0)
    np.savez(flat, X=rng.normal(size=(50, 10)), y=np.arange(50) % 2)
    line = assert_one_error_line(
        cli(*h, "train", "--model", "digits", "--arch", "cnn", "--data", str(flat))
    )
    assert "10 features is not a square" in line
    assert "available: cnn, mlp" in assert_one_error_line(
        cli(*h, "train", "--model", "digits", "--arch", "rnn")
    )
    assert "accepted: int8, int8-dynamic" in assert_one_error_line(
        cli(*h, "quantize", "digits:1", "--variants", "int4")
    )
    assert versions_count(cli, trained) == before
    usage = cli(*h, "train")
    assert usage.code == 2 and "Missing option '--model'" in usage.err


def test_unreachable_database_and_s3(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(k, v)
    line = assert_one_error_line(
        cli(
            "--home",
            str(tmp_path / "h"),
            "--db-url",
            "postgresql://fleet:secret@127.0.0.1:1/fleet",
            "init",
        )
    )
    assert "(unavailable)" in line and "127.0.0.1:1" in line and "secret" not in line
    assert not (tmp_path / "h" / "keys").exists()  # nothing written
    line = assert_one_error_line(
        cli(
            "--home",
            str(tmp_path / "h2"),
            "--artifacts",
            "s3://models",
            "--s3-endpoint-url",
            "http://127.0.0.1:1",
            "init",
        )
    )
    assert "(unavailable)" in line and "http://127.0.0.1:1" in line
    line = assert_one_error_line(
        cli("--home", str(tmp_path / "h3"), "--artifacts", "gs://b/m", "init")
    )
    assert "supported: file, s3" in line
    line = assert_one_error_line(
        cli("--home", str(tmp_path / "h4"), "--db-url", "mysql://x@127.0.0.1/db", "init")
    )
    assert "accepted: sqlite, postgresql" in line


def test_uninitialised_home_says_run_init(cli: Cli, tmp_path: Path) -> None:
    line = assert_one_error_line(cli("--home", str(tmp_path / "empty"), "models", "ls"))
    assert "run 'fleet init' first" in line


def test_promote_archives_previous_production(cli: Cli, tmp_path: Path) -> None:
    h = ["--home", str(tmp_path / "h")]
    assert cli(*h, "init").code == 0
    for _ in range(2):
        assert cli(*h, "train", "--model", "m", "--arch", "mlp", "--epochs", "1").code == 0
    assert cli(*h, "models", "promote", "m:1").code == 0
    r = cli(*h, "models", "promote", "m:2", "--json")
    assert json.loads(r.out) == {"model": "m", "version": 2, "stage": "production", "archived": [1]}
    assert show_json(cli, tmp_path / "h", "m@production")["version"] == 2
    assert show_json(cli, tmp_path / "h", "m:1")["stage"] == "archived"
    assert "accepted: none, staging" in assert_one_error_line(
        cli(*h, "models", "promote", "m:1", "--stage", "live")
    )


def test_import_sklearn_model_matches_original(cli: Cli, tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgefleet.models.runtime import open_session

    d = load_digits()
    x = d.data.astype(np.float32)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(
        x[:1400], d.target[:1400]
    )
    onx = to_onnx(clf, x[:1], options={"zipmap": False}, target_opset=17)
    path = tmp_path / "skl.onnx"
    path.write_bytes(onx.SerializeToString())
    np.savez(tmp_path / "eval.npz", X=x[1400:], y=d.target[1400:])
    h = ["--home", str(tmp_path / "h")]
    assert cli(*h, "init").code == 0
    r = cli(
        *h,
        "models",
        "import",
        str(path),
        "--name",
        "skl",
        "--eval-data",
        str(tmp_path / "eval.npz"),
        "--json",
    )
    assert r.code == 0, r.err
    v = json.loads(r.out)
    want = float((clf.predict(x[1400:]) == d.target[1400:]).mean())
    assert v["lineage"]["source"] == "import" and v["lineage"]["origin"]["format"] == "onnx"
    assert v["variants"][0]["name"] == "fp32"
    assert abs(v["variants"][0]["accuracy"] - want) < 1e-9
    assert cli(*h, "models", "export", "skl:1", "--out", str(tmp_path / "out")).code == 0
    served = open_session((tmp_path / "out" / "skl-1-fp32.onnx").read_bytes(), "onnxruntime")
    assert np.array_equal(served.run(x[1400:]), clf.predict(x[1400:]))
    np.savez(tmp_path / "narrow.npz", X=x[1400:, :63], y=d.target[1400:])
    line = assert_one_error_line(
        cli(
            *h,
            "models",
            "import",
            str(path),
            "--name",
            "skl",
            "--eval-data",
            str(tmp_path / "narrow.npz"),
        )
    )
    assert "does not fit" in line and "float32[N,64]" in line
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    line = assert_one_error_line(cli(*h, "models", "import", str(junk), "--name", "skl"))
    assert "accepted: .onnx, .tflite" in line
    assert versions_count(cli, tmp_path / "h") == 1
    tfl = cli(*h, "quantize", "skl:1", "--variants", "tflite-fp32")
    assert "need a trainable checkpoint" in assert_one_error_line(tfl)


def test_import_tflite_roundtrip(cli: Cli, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    assert (
        cli(
            "--home",
            str(trained),
            "models",
            "export",
            "digits:1",
            "--variant",
            "tflite-fp32",
            "--out",
            str(out),
        ).code
        == 0
    )
    h = ["--home", str(tmp_path / "h")]
    assert cli(*h, "init").code == 0
    r = cli(
        *h, "models", "import", str(out / "digits-1-tflite-fp32.tflite"), "--name", "edge", "--json"
    )
    assert r.code == 0, r.err
    v = json.loads(r.out)
    assert v["variants"][0]["name"] == "tflite-fp32" and v["variants"][0]["runtime"] == "litert"
    assert v["inputs"][0]["shape"] == [-1, 64]
