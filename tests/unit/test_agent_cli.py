"""`fleet-agent enroll` and its config file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.config import config_from_bundle, load_config, write_config
from edgefleet.protos.errors import AlreadyExists, InvalidArgument, NotFound


def pem() -> str:
    return (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def bundle(**kw: object) -> bytes:
    b = {
        "device_id": "cam-1",
        "broker_url": "mqtt://127.0.0.1:1883",
        "signing_public_key": pem(),
        "topic_prefix": "ef/v1",
        "group": "lobby",
        "tags": {"site": "paris"},
    }
    b.update(kw)
    return json.dumps(b).encode()


def test_enroll_writes_a_private_config_that_run_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = config_from_bundle(bundle(), state_dir=tmp_path / "state", listen="127.0.0.1:0")
    path = tmp_path / "etc" / "agent.json"
    write_config(path, s, force=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_config(path)
    assert (
        loaded.device_id == "cam-1"
        and loaded.tags == {"site": "paris"}
        and loaded.state_dir == tmp_path / "state"
    )
    monkeypatch.setenv("FLEET_AGENT_BROKER_URL", "mqtt://127.0.0.1:2883")
    assert load_config(path).broker_url == "mqtt://127.0.0.1:2883"  # the environment wins
    with pytest.raises(AlreadyExists, match="--force"):
        write_config(path, s, force=False)


def test_bad_bundles_and_configs_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not JSON"):
        config_from_bundle(b"{nope", state_dir=tmp_path, listen="")
    with pytest.raises(InvalidArgument, match="lacks broker_url"):
        config_from_bundle(bundle(broker_url=""), state_dir=tmp_path, listen="")
    with pytest.raises(InvalidArgument, match="not a PEM Ed25519 key"):
        config_from_bundle(bundle(signing_public_key="hello"), state_dir=tmp_path, listen="")
    with pytest.raises(NotFound, match="fleet-agent enroll"):
        load_config(tmp_path / "missing.json")


def test_a_listen_address_without_grpcio_is_refused_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from edgefleet.agent.agent import Agent
    from edgefleet.agent.config import require_server

    s = config_from_bundle(bundle(), state_dir=tmp_path / "state", listen="127.0.0.1:50051")
    monkeypatch.setitem(sys.modules, "grpc", None)  # how Python marks a module not importable
    with pytest.raises(InvalidArgument) as e:
        Agent(s, config_path=tmp_path / "agent.json")
    msg = str(e.value)
    assert f"agent config {tmp_path / 'agent.json'}: listen is '127.0.0.1:50051'" in msg
    assert "pip install 'edgefleet-agent[serve]'" in msg and "set listen to ''" in msg
    with pytest.raises(InvalidArgument, match="fleet-agent enroll --listen: listen is 'unix:/x'"):
        require_server("unix:/x", "fleet-agent enroll --listen")
    Agent(s.model_copy(update={"listen": ""}))  # no local server: grpc is not needed


def test_enroll_listens_by_default_only_where_grpc_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fleet-agent enroll` without --listen: the local server where gRPC (the `serve`
    extra) is installed; none, said on stderr, where it is not; an explicit --listen
    without gRPC is refused and writes nothing."""
    import sys

    from typer.testing import CliRunner

    from edgefleet.agent.cli import app

    src = tmp_path / "bundle.json"
    src.write_bytes(bundle())
    runner = CliRunner()

    def enroll(name: str, *extra: str) -> tuple[int, str, Path]:
        cfg = tmp_path / name
        r = runner.invoke(
            app, ["enroll", str(src), "--config", str(cfg), "--state-dir", str(tmp_path), *extra]
        )
        return r.exit_code, r.output, cfg

    code, _, cfg = enroll("with.json")
    assert code == 0 and load_config(cfg).listen == "127.0.0.1:50051"
    monkeypatch.setitem(sys.modules, "grpc", None)  # how Python marks a module not importable
    code, out, cfg = enroll("without.json")
    assert code == 0 and load_config(cfg).listen == ""
    assert "no local InferenceService (grpcio is not installed" in out
    code, out, cfg = enroll("asked.json", "--listen", "127.0.0.1:50051")
    assert code != 0 and not cfg.exists()
