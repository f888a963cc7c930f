"""Operators against a real `fleet serve`: named tokens and roles, the audit log of every
deploy/promote/rollback/abort with the token's name, revocation, and FleetService TLS
(a generated certificate; a wrong CA refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.cloud.config import ServeInfo
from tests.conftest import Cli
from tests.e2e.test_serve import REPO, _env, fleet_serve
from tests.support.e2e import Version, trained_home


@pytest.fixture(scope="module")
def op_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised FLEET_HOME holding digits:1 and two enrolled devices that said hello
    once (capabilities known) and never answer again."""
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices.store import Birth
    from tests.e2e.test_serve import CPU

    h = trained_home(tmp_path_factory.mktemp("ops"), Version(epochs=1))
    client = LocalClient(load_settings(home=h))
    for d in ("d1", "d2"):
        client.enroll_device(d, group="lab", tags={})
        client.devices.record_status(d, Birth(True, capabilities=CPU))
        client.devices.record_status(d, Birth(False))
    client.close()
    return h


@pytest.fixture(scope="module")
def served(op_home: Path) -> Iterator[ServeInfo]:
    with fleet_serve(op_home) as (_proc, info):
        yield info


def _as(home: Path, info: ServeInfo, token: str | None = None) -> tuple[str, ...]:
    base = ("--home", str(home), "--coordinator", info.grpc)
    return (*base, "--token", token) if token else base


def _token(cli: Cli, home: Path, info: ServeInfo, name: str, role: str) -> str:
    r = cli(*_as(home, info), "tokens", "create", name, "--role", role)  # as admin (keys/token)
    assert r.code == 0, r.err
    secret = r.out.strip()
    assert len(secret) >= 43 and "\n" not in secret
    return secret


def _audit(cli: Cli, home: Path, info: ServeInfo, *args: str) -> list[dict[str, Any]]:
    r = cli(*_as(home, info), "audit", "ls", "--json", *args)
    assert r.code == 0, r.err
    return list(json.loads(r.out))


def _wait_until_started(cli: Cli, me: tuple[str, ...], rollout_id: str) -> None:
    """Until the controller has taken the rollout out of `pending` (reads are not audited)."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = cli(*me, "rollouts", "show", rollout_id, "--json")
        assert r.code == 0, r.err
        if json.loads(r.out)["state"] != "pending":
            return
        time.sleep(0.2)
    pytest.fail(f"rollout {rollout_id} still pending after 60 s")


def test_a_viewer_token_reads_but_cannot_deploy(cli: Cli, op_home: Path, served: ServeInfo) -> None:
    viewer = _token(cli, op_home, served, "ci-viewer", "viewer")
    ls = cli(*_as(op_home, served, viewer), "models", "ls")
    assert ls.code == 0, ls.err
    assert "digits" in ls.out
    r = cli(*_as(op_home, served, viewer), "deploy", "digits:1", "--to", "all", "--timeout", "5")
    assert r.code == 1
    assert r.err.strip().splitlines() == [
        "error (permission-denied): token 'ci-viewer' (viewer) may not call Deploy; needs operator"
    ]
    r = cli(*_as(op_home, served, viewer), "tokens", "create", "sneaky", "--role", "admin")
    assert r.code == 1 and "may not call CreateToken; needs admin" in r.err
    r = cli(*_as(op_home, served, viewer), "audit", "ls")
    assert r.code == 1 and "may not call ListAudit; needs operator" in r.err
    refused = _audit(cli, op_home, served, "--who", "ci-viewer")
    assert [(e["action"], e["result"], e["role"]) for e in refused] == [
        ("Deploy", "PERMISSION_DENIED", "viewer"),
        ("CreateToken", "PERMISSION_DENIED", "viewer"),
    ]
    assert refused[0]["args"]["ref"] == "digits:1"
    assert refused[0]["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    # nothing of the refused calls happened
    tokens = cli(*_as(op_home, served), "tokens", "ls", "--json")
    assert "sneaky" not in {t["name"] for t in json.loads(tokens.out)}


def test_every_operator_action_is_audited_with_the_tokens_name(
    cli: Cli, op_home: Path, served: ServeInfo
) -> None:
    ops = _token(cli, op_home, served, "release-bot", "operator")
    me = _as(op_home, served, ops)
    r = cli(*me, "models", "promote", "digits:1", "--stage", "production")
    assert r.code == 0, r.err
    # all at once to a device never online: said at once, it updates when it connects
    r = cli(*me, "deploy", "digits:1", "--to", "device=d1", "--timeout", "2")
    assert r.code == 0 and "1 offline (they update when they reconnect)" in r.err, r.err
    ids = []
    for action in ("abort", "rollback"):
        r = cli(*me, "deploy", "digits:1", "--to", "group=lab", "--canary", "50%", "--waves", "100%",
                "--no-watch", "--json")  # fmt: skip
        assert r.code == 0, r.err
        rid = json.loads(r.out)["rollout_id"]
        ids.append(rid)
        _wait_until_started(cli, me, rid)
        assert cli(*me, "rollouts", "pause", rid).code == 0
        assert cli(*me, "rollouts", "resume", rid).code == 0
        done = cli(*me, "rollouts", action, rid)
        assert done.code == 0, done.err
    mine = _audit(cli, op_home, served, "--who", "release-bot")
    got = [
        (e["action"], e["args"].get("action", ""), e["args"].get("rollout_id", "")) for e in mine
    ]
    assert got == [
        ("Promote", "", ""),
        ("Deploy", "", ""),
        ("Deploy", "", ""),
        ("ControlRollout", "pause", ids[0]),
        ("ControlRollout", "resume", ids[0]),
        ("ControlRollout", "abort", ids[0]),
        ("Deploy", "", ""),
        ("ControlRollout", "pause", ids[1]),
        ("ControlRollout", "resume", ids[1]),
        ("ControlRollout", "rollback", ids[1]),
    ]
    assert [(e["result"], e["role"]) for e in mine] == [("ok", "operator")] * len(mine), [
        (e["action"], e["result"], e["message"]) for e in mine
    ]
    assert mine[0]["args"] == {"ref": "digits:1", "stage": "production"}
    assert mine[1]["args"]["selector"] == "device=d1"
    # a call that fails is recorded with the status it ended with
    r = cli(*me, "models", "promote", "digits:99")
    assert r.code == 1 and "error (not-found)" in r.err
    failed = _audit(cli, op_home, served, "--who", "release-bot", "--action", "Promote")[-1]
    assert (failed["args"]["ref"], failed["result"]) == ("digits:99", "NOT_FOUND")
    assert "99" in failed["message"]
    # filters, and the table view
    promotes = _audit(cli, op_home, served, "--action", "promote", "--since", "1h")
    assert [e["who"] for e in promotes] == ["release-bot", "release-bot"]
    table = cli(*_as(op_home, served), "audit", "ls", "--who", "release-bot")
    assert table.code == 0 and table.out.count("release-bot") == len(mine) + 1
    # the token's creation is in the log too, by the admin token
    created = _audit(cli, op_home, served, "--action", "CreateToken")
    assert ("admin", "release-bot") in {(e["who"], e["args"]["name"]) for e in created}
    assert all("secret" not in json.dumps(e["args"]) or "(secret)" in json.dumps(e["args"])
               for e in created)  # fmt: skip


def test_a_revoked_token_is_refused_at_once(cli: Cli, op_home: Path, served: ServeInfo) -> None:
    secret = _token(cli, op_home, served, "temp", "operator")
    assert cli(*_as(op_home, served, secret), "status").code == 0
    r = cli(*_as(op_home, served), "tokens", "revoke", "temp")
    assert r.code == 0, r.err
    r = cli(*_as(op_home, served, secret), "status")
    assert r.code == 1
    assert "error (unauthenticated): API token 'temp' was revoked at" in r.err
    r = cli(*_as(op_home, served, secret), "models", "promote", "digits:1")
    assert r.code == 1
    (entry,) = _audit(cli, op_home, served, "--who", "temp")
    assert (entry["action"], entry["result"]) == ("Promote", "UNAUTHENTICATED")
    listed = json.loads(cli(*_as(op_home, served), "tokens", "ls", "--json").out)
    assert {t["name"]: t["active"] for t in listed}["temp"] is False


def test_local_cli_actions_are_audited_as_the_unix_user(
    cli: Cli, op_home: Path, tmp_path: Path
) -> None:
    from edgefleet.cloud.access.client import local_user

    h = ("--home", str(op_home))
    assert cli(*h, "models", "promote", "digits:1", "--stage", "staging").code == 0
    assert cli(*h, "models", "promote", "digits:99").code == 1
    r = cli(*h, "audit", "ls", "--json", "--who", local_user(), "--action", "Promote")
    assert r.code == 0, r.err
    entries = json.loads(r.out)
    assert [(e["args"]["ref"], e["result"]) for e in entries][-2:] == [
        ("digits:1", "ok"),
        ("digits:99", "NOT_FOUND"),
    ]
    # device revocation and key rotation are operator actions too (on a copy: the
    # module's home keeps its two devices for the tests after this one)
    own = tmp_path / "home"
    shutil.copytree(op_home, own)
    (own / "serve.json").unlink(missing_ok=True)
    h = ("--home", str(own))
    assert cli(*h, "devices", "enroll", "aud-1", "--out", "-").code == 0
    assert cli(*h, "devices", "revoke", "aud-1").code == 0
    assert cli(*h, "keys", "rotate").code == 0
    r = cli(*h, "audit", "ls", "--json", "--who", local_user())
    done = [(e["action"], e["result"]) for e in json.loads(r.out)]
    assert ("RevokeDevice", "ok") in done and ("RotateKeys", "ok") in done


def test_fleet_serve_over_tls_with_a_generated_certificate(
    cli: Cli, op_home: Path, tmp_path: Path
) -> None:
    from edgefleet.cloud.fl.tls import ensure_tls

    home = tmp_path / "home"
    shutil.copytree(op_home, home)
    (home / "serve.json").unlink(missing_ok=True)
    with fleet_serve(home, "--grpc-tls") as (_proc, info):
        assert info.grpc_tls and info.grpc_ca == str(home / "tls" / "ca.crt")
        key = home / "tls" / "server.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "serve.json").stat().st_mode) == 0o600
        # the CLI finds the CA through serve.json …
        r = cli("--home", str(home), "--coordinator", info.grpc, "status", "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out)["devices"] == 2
        # … or is given it
        other = tmp_path / "elsewhere"
        r = cli("--home", str(other), "--coordinator", info.grpc, "--ca", info.grpc_ca,
                "--token", (home / "keys" / "token").read_text().strip(), "models", "ls")  # fmt: skip
        assert r.code == 0, r.err
        # a certificate from another CA does not pass
        wrong = ensure_tls(tmp_path / "wrong-ca").ca_cert
        r = cli("--home", str(home), "--coordinator", info.grpc, "--ca", str(wrong), "status")
        assert r.code == 1
        assert "TLS handshake failed" in r.err and "--ca" in r.err


# -- FleetService off loopback: a generated certificate, verified from another host -------


@contextlib.contextmanager
def other_host() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (its name, our address)."""
    import random
    import uuid

    name = f"efop-{uuid.uuid4().hex[:6]}"
    net = random.randrange(1, 250)
    ours, theirs = f"10.231.{net}.1", f"10.231.{net}.2"
    veth = f"vo{name[-6:]}"
    cmds = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name],
        ["ip", "addr", "add", f"{ours}/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", name, "addr", "add", f"{theirs}/30", "dev", "eth0"],
        ["ip", "-n", name, "link", "set", "eth0", "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
    ]
    try:
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                if os.environ.get("CI"):
                    pytest.fail(f"cannot make a test host ({' '.join(c)}): {r.stderr.strip()}")
                pytest.skip(f"network namespaces unavailable ({' '.join(c)}: {r.stderr.strip()})")
        yield name, ours
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _fleet_in(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "edgefleet.cloud.cli.main", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_off_loopback_fleetservice_serves_tls_that_another_host_verifies(
    op_home: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(op_home, home)
    (home / "serve.json").unlink(missing_ok=True)
    with (
        other_host() as (ns, address),
        fleet_serve(home, "--grpc-listen", f"{address}:0") as (
            _proc,
            info,
        ),
    ):
        assert info.grpc.startswith(f"{address}:") and info.grpc_tls
        ca = home / "tls" / "ca.crt"
        assert info.grpc_ca == str(ca)
        token = (home / "keys" / "token").read_text().strip()
        elsewhere = tmp_path / "operator"  # the operator's own FLEET_HOME, on the other host
        base = ("--home", str(elsewhere), "--coordinator", info.grpc, "--token", token)
        r = _fleet_in(ns, *base, "--ca", str(ca), "status", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["devices"] == 2
        # without the CA: the system's roots do not know it
        r = _fleet_in(ns, *base, "status")
        assert r.returncode == 1
        assert "TLS handshake failed" in r.stderr
        # the token never crosses in clear: a plaintext client gets nowhere
        import grpc

        from edgefleet.protos.fleet.v1 import fleet_pb2, fleet_pb2_grpc

        with grpc.insecure_channel(info.grpc) as ch:
            with pytest.raises(grpc.RpcError) as e:
                fleet_pb2_grpc.FleetServiceStub(ch).Status(
                    fleet_pb2.StatusRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
