"""Flower's Control API is not reachable with device material.

`fleet serve --fl` runs the SuperLink on loopback and puts the Fleet API gateway
(cloud.fl.gateway) on --fl-listen. A caller holding only a device's FL bundle (the
CA certificate, a node key, the advertised address) cannot list runs or register a
node; the SuperLink's Fleet API still answers through the gateway.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.config import ServeInfo
from edgefleet.protos.errors import NotFound
from edgefleet.protos.flower import find_flower, flower_available, flower_env
from tests.e2e.test_serve import fleet_serve

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)
if not flower_available():
    pytest.skip("Flower is not installed (edgefleet[fl])", allow_module_level=True)


@pytest.fixture(scope="module")
def fl_served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, ServeInfo, dict[str, Any]]]:
    from edgefleet.cloud.cli.main import run

    tmp = tmp_path_factory.mktemp("flctl")
    home = tmp / "home"
    assert run(["--home", str(home), "init"]) == 0
    with fleet_serve(home, "--fl", "--fl-listen", "127.0.0.1:0") as (_proc, info):
        out = tmp / "dev.json"
        assert (
            run(["--home", str(home), "devices", "enroll", "dev-1", "--fl", "--out", str(out)]) == 0
        )
        yield home, info, json.loads(out.read_text())["fl"]


def _post(address: str, ca_pem: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cadata=ca_pem)
    req = urllib.request.Request(f"https://{address}{path}", data=body, method="POST")
    req.add_header("content-type", "application/protobuf")
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _attacker_flwr(tmp: Path, fl: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """`flwr ARGS --format json` as someone holding only the device's FL bundle."""
    home = tmp / "attacker-flwr"
    home.mkdir(exist_ok=True)
    (home / "ca.crt").write_text(fl["ca_certificate"])
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "stolen"\n\n[superlink.stolen]\n'
        f'address = "{fl["superlink"]}"\nroot-certificates = "{home / "ca.crt"}"\n'
    )
    return subprocess.run(
        [find_flower("flwr"), *args, "--format", "json"],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _answer(p: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    start = p.stdout.find("{")
    assert start >= 0, (p.returncode, p.stdout, p.stderr)
    return dict(json.loads(p.stdout[start:]))


def _coordinator_nodes(home: Path) -> list[dict[str, Any]]:
    p = subprocess.run(
        [find_flower("flwr"), "supernode", "ls", "fleet", "--format", "json"],
        env=flower_env(home / "fl" / "flwr-home"),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    start = p.stdout.find("{")
    return list(json.loads(p.stdout[start:]).get("nodes") or [])


def test_the_fl_bundle_does_not_open_the_control_api(
    fl_served: tuple[Path, ServeInfo, dict[str, Any]], tmp_path: Path
) -> None:
    from edgefleet.cloud.fl.tls import new_node_key

    home, info, fl = fl_served
    assert fl["superlink"] == info.fl_superlink
    nodes_before = _coordinator_nodes(home)
    assert len(nodes_before) == 1  # dev-1's key, registered by the coordinator

    listed = _answer(_attacker_flwr(tmp_path, fl, "ls", "stolen"))
    assert listed["success"] is False and "runs" not in listed
    assert "404" in listed["error-message"]
    rogue = tmp_path / "rogue.pub"
    rogue.write_text(new_node_key().public_openssh + "\n")
    reg = _answer(_attacker_flwr(tmp_path, fl, "supernode", "register", str(rogue), "stolen"))
    assert reg["success"] is False and "node-id" not in reg
    assert "404" in reg["error-message"]
    assert len(_coordinator_nodes(home)) == len(nodes_before)  # no rogue node

    # at the HTTP level: the Control and runtime APIs are not there; the Fleet API is
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/acquire-task"):
        status, body = _post(info.fl_superlink, fl["ca_certificate"], path)
        assert (status, body) == (404, b"not served here: devices reach only the Fleet API\n")
    status, body = _post(info.fl_superlink, fl["ca_certificate"], "/v1/fleet/get-run")
    assert status != 404 and b"not served here" not in body  # answered by the SuperLink
    with urllib.request.urlopen(
        f"https://{info.fl_superlink}/health",
        timeout=10,
        context=ssl.create_default_context(cadata=fl["ca_certificate"]),
    ) as r:
        assert r.status == 200


def test_the_superlink_itself_listens_on_loopback_only(
    fl_served: tuple[Path, ServeInfo, dict[str, Any]],
) -> None:
    home, info, _fl = fl_served
    config = (home / "fl" / "flwr-home" / "config.toml").read_text()
    internal = config.split('address = "', 1)[1].split('"', 1)[0]
    assert internal.startswith("127.0.0.1:") and internal != info.fl_superlink
    log = (home / "fl" / "superlink.log").read_text(errors="replace")
    assert "0.0.0.0" not in log


def test_gateway_paths() -> None:
    from edgefleet.cloud.fl.gateway import allowed

    assert allowed("POST", "/v1/fleet/pull-messages")
    assert allowed("GET", "/health")
    assert not allowed("GET", "/v1/fleet/pull-messages")
    assert not allowed("POST", "/v1/control/list-runs")
    assert not allowed("POST", "/v1/fleet/../control/list-runs")
    assert not allowed("POST", "/v1/runtime/pull-task-input")
    assert not allowed("GET", "/docs")
