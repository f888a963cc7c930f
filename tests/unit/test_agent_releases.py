"""Agent releases as values: the manifest kind, the release tar, the device's records."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import pytest

from edgefleet.agent.inference import ModelHolder
from edgefleet.agent.selfupdate import CURRENT, MARKER, Releases
from edgefleet.agent.server import serve
from edgefleet.cloud.agent_releases import pack
from edgefleet.protos.errors import DataLoss, InvalidArgument, Unavailable
from edgefleet.protos.manifest import AGENT_KIND, Manifest, decode_manifest, encode_manifest
from tests.conftest import Cli


def _manifest(**kw: object) -> Manifest:
    base: dict[str, object] = {
        "model": "edgefleet-agent",
        "version": 3,
        "variant": "aarch64",
        "runtime": "",
        "sha256": "a" * 64,
        "size": 10,
        "inputs": (),
        "outputs": (),
        "created_at_ms": 1,
        "labels": {"agent_version": "0.2.0"},
        "kind": AGENT_KIND,
    }
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


def test_agent_release_manifest_round_trips_and_refuses_a_runtime() -> None:
    m = _manifest()
    assert decode_manifest(encode_manifest(m)) == m
    with pytest.raises(InvalidArgument, match="agent release .* has runtime 'onnxruntime'"):
        encode_manifest(_manifest(runtime="onnxruntime"))
    with pytest.raises(InvalidArgument, match="kind 'firmware' unknown"):
        encode_manifest(_manifest(kind="firmware"))
    with pytest.raises(InvalidArgument, match="runtime '' unknown"):
        encode_manifest(_manifest(kind=""))  # a model variant still needs its runtime


def _wheel(d: Path, name: str) -> None:
    (d / name).write_bytes(name.encode() * 3)


def test_pack_needs_exactly_the_agent_wheel_of_the_version_and_is_deterministic(
    tmp_path: Path,
) -> None:
    _wheel(tmp_path, "numpy-2.0.0-cp311-cp311-manylinux_2_17_aarch64.whl")
    with pytest.raises(InvalidArgument, match="no edgefleet_agent-0.2.0-py3-none-any.whl"):
        pack(tmp_path, agent_version="0.2.0")
    _wheel(tmp_path, "edgefleet_agent-0.2.0-py3-none-any.whl")
    data, names = pack(tmp_path, agent_version="0.2.0")
    assert names == (
        "edgefleet_agent-0.2.0-py3-none-any.whl",
        "numpy-2.0.0-cp311-cp311-manylinux_2_17_aarch64.whl",
    )
    assert pack(tmp_path, agent_version="0.2.0")[0] == data  # same bytes, same digest
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [m.mtime for m in tar.getmembers()] == [0, 0]
    _wheel(tmp_path, "edgefleet_agent-0.1.0-py3-none-any.whl")
    with pytest.raises(InvalidArgument, match="versions 0.1.0, 0.2.0: keep one"):
        pack(tmp_path, agent_version="0.2.0")
    with pytest.raises(InvalidArgument, match="is not a version"):
        pack(tmp_path, agent_version="../x")


def test_install_refuses_a_tar_with_anything_but_wheels(tmp_path: Path) -> None:
    archive = tmp_path / "r.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../../etc/passwd")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    releases = Releases(tmp_path / "state")
    with pytest.raises(DataLoss, match=r"entry '../../etc/passwd' is not a wheel file"):
        releases.install(archive, version="0.2.0", sha256="b" * 64)
    assert not (tmp_path / "state" / "agent-releases" / "0.2.0").exists()


def _fake_release(releases: Releases, version: str) -> Path:
    root = releases.root / version
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")
    (root / MARKER).write_text(json.dumps({"version": version, "sha256": "c" * 64}))
    return root


def test_records_current_link_gc_and_drop(tmp_path: Path) -> None:
    releases = Releases(tmp_path)
    r1, r2, r3 = (_fake_release(releases, v) for v in ("0.1.1", "0.1.2", "0.1.3"))
    assert releases.installed("0.1.1", "c" * 64) is not None
    assert releases.installed("0.1.1", "d" * 64) is None  # another release's digest
    assert releases.current() is None and releases.previous() is None
    releases.set_current(str(r2), previous={"version": "0.1.0", "python": "/opt/x", "root": ""})
    assert releases.current() == r2.resolve()
    assert (releases.root / CURRENT).is_symlink()
    assert releases.previous() == {"version": "0.1.0", "python": "/opt/x", "root": ""}
    assert not releases.drop("0.1.2")  # the current one stays
    assert releases.drop("0.1.3") and not r3.exists()
    assert releases.gc({str(r2)}) == ["0.1.1"] and not r1.exists() and r2.exists()
    releases.set_current("", previous={"version": "0.1.2", "python": "p", "root": str(r2)})
    assert releases.current() is None
    releases.mark_failed("e" * 64, "AGENT_CHECK_FAILED: selfcheck exited 5")
    assert releases.failed("e" * 64) == "AGENT_CHECK_FAILED: selfcheck exited 5"
    releases.forget_failed("e" * 64)
    assert releases.failed("e" * 64) is None


def test_a_new_agent_version_binds_the_port_beside_the_old_one_only_when_sharing() -> None:
    async def main() -> None:
        old, port = await serve(ModelHolder(), address="127.0.0.1:0")
        try:
            with pytest.raises(
                Unavailable, match=f"cannot bind InferenceService to '127.0.0.1:{port}'"
            ):
                await serve(ModelHolder(), address=f"127.0.0.1:{port}")
            new, again = await serve(ModelHolder(), address=f"127.0.0.1:{port}", share_port=True)
            assert again == port
            await new.stop(0)
        finally:
            await old.stop(0)

    asyncio.run(main())


def test_publish_and_ls_through_the_cli(cli: Cli, fleet_home: Path, tmp_path: Path) -> None:
    assert cli("init").code == 0
    release = tmp_path / "release"
    release.mkdir()
    _wheel(release, "edgefleet_agent-0.2.0-py3-none-any.whl")
    assert "no agent releases" in cli("agent", "releases", "ls").out
    bad = cli(
        "agent", "releases", "publish", str(release), "--version", "0.2.0", "--platform", "ARM"
    )
    assert bad.code == 1 and "platform 'ARM' is not a machine name" in bad.err, bad
    done = cli(
        "agent", "releases", "publish", str(release), "--version", "0.2.0", "--platform", "aarch64"
    )
    assert done.code == 0, done.err
    assert "published edgefleet-agent:1: agent 0.2.0 for aarch64" in done.out
    listed = json.loads(cli("agent", "releases", "ls", "--json").out)
    assert [(r["ref"], r["agent_version"], r["platform"]) for r in listed] == [
        ("edgefleet-agent:1", "0.2.0", "aarch64")
    ]
    assert listed[0]["wheels"] == ["edgefleet_agent-0.2.0-py3-none-any.whl"]
    shown = json.loads(cli("models", "show", "edgefleet-agent:1", "--json").out)
    assert shown["variants"][0]["name"] == "aarch64"
