"""Bulk enrolment against a real Mosquitto with identities on: a batch is one credential
write and one broker reload, every device of it then connects with its own credential,
and a batch that cannot be enrolled whole enrols none.

The coordinator side is the in-process `LocalClient` wired to the test's broker the way
`fleet serve` wires its own (`CredentialApplier` over "rewrite the files, SIGHUP").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.devices import DeviceSpec
from edgefleet.cloud.identity import CredentialApplier, verify_password
from edgefleet.protos.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from edgefleet.protos.transport import MqttAccess, MqttTransport
from tests.conftest import Cli
from tests.support.identity import SecureBroker

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


@pytest.fixture
def client(tmp_path: Path, broker: SecureBroker) -> Iterator[LocalClient]:
    """A FLEET_HOME whose identities the test broker enforces; enrolments apply them to
    it before they return, as through `fleet serve`."""
    home = tmp_path / "home"
    c = LocalClient(load_settings(home=home))
    c.init()
    broker.use_identities(c.identities)
    c.app.apply_credentials = CredentialApplier(c.identities, broker.apply)
    yield c
    c.close()


async def _connects(url: str, device_id: str, password: str) -> bool:
    """Whether `device_id` gets in with `password` (a refusal is False, not an error)."""
    access = MqttAccess(url, username=device_id, password=password)
    t = MqttTransport(access.settings(device_id))
    try:
        async with t:
            await t.wait_connected(timeout=10)
    except Unauthenticated:
        return False
    return True


def test_a_batch_is_one_reload_and_every_device_connects_with_its_own_credential(
    client: LocalClient, broker: SecureBroker
) -> None:
    ids = [f"bulk-{i:02d}" for i in range(24)]
    reloads = broker.broker.reloads
    batch = client.enroll_devices(
        [DeviceSpec(d, "lab", {"site": "paris"}) for d in ids], broker_url=broker.url
    )
    assert [b.device_id for b in batch.bundles] == ids and batch.existing == ()
    # one write of the records, one rewrite of the broker's files, one SIGHUP
    assert broker.broker.reloads - reloads == 1
    ident = client.identities
    assert ident.applied() == ident.version()
    assert {d.device_id for d in client.devices.find()} == set(ids)
    assert {d.group for d in client.devices.find()} == {"lab"}
    hashes = ident.password_hashes(kind="device")
    for b in batch.bundles:
        assert b.username == b.device_id and b.password
        assert verify_password(b.password, hashes[b.device_id])
        cert = x509.load_pem_x509_certificate((b.client_certificate or "").encode())
        assert cert.subject.rfc4514_string() == f"CN={b.device_id}"
    assert len({b.password for b in batch.bundles}) == len(ids)

    async def every_device() -> list[bool]:
        return list(
            await asyncio.gather(
                *(_connects(broker.url, b.device_id, b.password or "") for b in batch.bundles)
            )
        )

    assert asyncio.run(every_device()) == [True] * len(ids)
    # its own only: another device's password does not let it in
    a, b = batch.bundles[0], batch.bundles[1]
    assert asyncio.run(_connects(broker.url, a.device_id, b.password or "")) is False


def test_a_batch_with_one_bad_or_known_id_enrols_none_and_loses_nothing(
    client: LocalClient, broker: SecureBroker
) -> None:
    first = client.enroll_devices(
        [DeviceSpec("keep-1"), DeviceSpec("keep-2")], broker_url=broker.url
    )
    ident = client.identities
    version, reloads = ident.version(), broker.broker.reloads
    records = (ident.directory / "credentials.json").read_bytes()

    with pytest.raises(InvalidArgument, match=r"entry 3: device id 'bad id': use 1-64 letters"):
        client.enroll_devices(
            [DeviceSpec("new-1"), DeviceSpec("new-2"), DeviceSpec("bad id")], broker_url=broker.url
        )
    with pytest.raises(InvalidArgument, match=r"'new-1' is listed twice"):
        client.enroll_devices([DeviceSpec("new-1"), DeviceSpec("new-1")], broker_url=broker.url)
    with pytest.raises(AlreadyExists, match=r"device 'keep-2' is already enrolled; nothing"):
        client.enroll_devices([DeviceSpec("new-1"), DeviceSpec("keep-2")], broker_url=broker.url)
    # nothing written, nothing reloaded, no device added
    assert ident.version() == version and broker.broker.reloads == reloads
    assert (ident.directory / "credentials.json").read_bytes() == records
    assert sorted(d.device_id for d in client.devices.find()) == ["keep-1", "keep-2"]
    # the devices enrolled before still get in with their credential
    for b in first.bundles:
        assert asyncio.run(_connects(broker.url, b.device_id, b.password or ""))

    # skip_existing: the known one is left as it is, the new one enrolled
    again = client.enroll_devices(
        [DeviceSpec("keep-2"), DeviceSpec("new-1")], broker_url=broker.url, skip_existing=True
    )
    assert again.existing == ("keep-2",)
    assert [b.device_id for b in again.bundles] == ["new-1"]
    keep2 = next(b for b in first.bundles if b.device_id == "keep-2")
    assert asyncio.run(_connects(broker.url, "keep-2", keep2.password or ""))
    assert asyncio.run(_connects(broker.url, "new-1", again.bundles[0].password or ""))
    # all of them known: nothing to do, no reload
    reloads = broker.broker.reloads
    none = client.enroll_devices([DeviceSpec("new-1")], broker_url=broker.url, skip_existing=True)
    assert none.bundles == () and none.existing == ("new-1",)
    assert broker.broker.reloads == reloads


def test_identity_re_enrol_in_a_batch_revokes_the_old_certificates(
    client: LocalClient, broker: SecureBroker
) -> None:
    """At the identity level a batch re-enrols like `enroll` does: new password, the old
    certificate on the CRL (the broker refuses it), the old password refused."""
    ident = client.identities
    old = ident.enroll_many(["re-1", "re-2"])
    broker.apply()
    assert asyncio.run(_connects(broker.url, "re-1", old["re-1"].password))
    new = ident.enroll_many(["re-1", "re-2", "re-3"])
    broker.apply()
    crl = x509.load_pem_x509_crl(ident.crl_pem().encode())
    for d in ("re-1", "re-2"):
        old_serial = x509.load_pem_x509_certificate(old[d].cert_pem.encode()).serial_number
        new_serial = x509.load_pem_x509_certificate(new[d].cert_pem.encode()).serial_number
        assert crl.get_revoked_certificate_by_serial_number(old_serial) is not None
        assert crl.get_revoked_certificate_by_serial_number(new_serial) is None
        assert new[d].password != old[d].password
    assert asyncio.run(_connects(broker.url, "re-1", old["re-1"].password)) is False
    assert asyncio.run(_connects(broker.url, "re-1", new["re-1"].password))


def test_fleet_devices_enroll_count_writes_one_bundle_per_device_and_refuses_bad_input(
    cli: Cli, fleet_home: Path, tmp_path: Path
) -> None:
    assert cli("init").code == 0
    out = tmp_path / "bundles"
    r = cli(
        "devices", "enroll", "--count", "12", "--prefix", "cam", "--group", "g", "--out", str(out)
    )
    assert r.code == 0, r.err
    assert "enrolled 12 devices in 1 batch" in r.err
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"cam-{i:04d}.json" for i in range(12)]
    assert out.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in out.iterdir())
    bundle = json.loads((out / "cam-0003.json").read_text())
    assert bundle["device_id"] == "cam-0003" and bundle["group"] == "g" and bundle["password"]

    ids = tmp_path / "ids.txt"
    ids.write_text("# lobby\nlob-1\n\nlob-2  # by the door\nlob 3\n")
    bad = cli("devices", "enroll", "--from-file", str(ids), "--out", str(tmp_path / "b2"))
    assert bad.code == 1
    assert f"{ids} line 5: device id 'lob 3': use 1-64 letters" in bad.err
    assert "nothing was enrolled" in bad.err
    ids.write_text("lob-1\nlob-2\ncam-0001\n")
    known = cli("devices", "enroll", "--from-file", str(ids), "--out", str(tmp_path / "b3"))
    assert known.code == 1 and "device 'cam-0001' is already enrolled" in known.err
    listed = json.loads(cli("devices", "ls", "--json").out)
    assert sorted(d["device_id"] for d in listed) == [f"cam-{i:04d}" for i in range(12)]
    assert not any((tmp_path / "b3").glob("*.json"))
    # the same folder again: refused before anything is enrolled (a bundle would be replaced)
    clash = cli("devices", "enroll", "cam-0003", "new-9", "--out", str(out))
    assert clash.code == 1 and "cam-0003.json exists" in clash.err
    assert "new-9" not in cli("devices", "ls").out
    # --skip-existing: the rest are enrolled, the known ones' bundles left as they were
    before = (out / "cam-0003.json").read_bytes()
    r = cli(
        "devices", "enroll", "cam-0003", "new-9", "--out", str(out), "--skip-existing", "--json"
    )
    assert r.code == 0, r.err
    assert json.loads(r.out)["existing"] == ["cam-0003"]
    assert json.loads(r.out)["enrolled"] == ["new-9"]
    assert (out / "cam-0003.json").read_bytes() == before
    assert (out / "new-9.json").exists()
    # each batch is in the audit log with the devices it named, refused ones too
    r = cli("audit", "ls", "--json", "--action", "EnrollDevices")
    entries = json.loads(r.out)
    results = [e["result"] for e in entries]
    assert results.count("ok") == 2 and "ALREADY_EXISTS" in results, results
    named = [[d["device_id"] for d in e["args"]["specs"]] for e in entries]
    assert ["cam-0003", "new-9"] in named


def test_reissue_keeps_the_device_and_cuts_its_old_password_at_once(
    client: LocalClient, broker: SecureBroker
) -> None:
    """A lost bundle: new credentials for enrolled devices, their rows untouched; the old
    password's open session is dropped by the one reload, the old certificate is on the
    CRL; an unknown or revoked id in the batch reissues none."""
    first = client.enroll_devices(
        [DeviceSpec(d, "lab", {"site": "paris"}) for d in ("ri-1", "ri-2", "ri-3")],
        broker_url=broker.url,
    )
    old = {b.device_id: b for b in first.bundles}
    ident = client.identities

    async def main() -> None:
        sessions = {}
        for d in ("ri-1", "ri-3"):
            access = MqttAccess(broker.url, username=d, password=old[d].password or "")
            t = MqttTransport(access.settings(d, backoff_base=0.2, backoff_cap=0.5))
            await t.__aenter__()
            await t.wait_connected(timeout=10)
            sessions[d] = t
        try:
            reloads = broker.broker.reloads
            new = await asyncio.to_thread(client.reissue_devices, ["ri-1", "ri-2"])
            assert broker.broker.reloads - reloads == 1
            assert [b.device_id for b in new.bundles] == ["ri-1", "ri-2"]
            async with asyncio.timeout(10):  # the old password's session is cut
                while sessions["ri-1"].connected:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            assert sessions["ri-3"].connected  # the one not reissued keeps its session
            for b in new.bundles:
                assert b.password != old[b.device_id].password
                assert b.client_certificate != old[b.device_id].client_certificate
                assert (b.group, b.tags) == ("lab", {"site": "paris"})
                assert await _connects(broker.url, b.device_id, b.password or "")
                assert not await _connects(broker.url, b.device_id, old[b.device_id].password or "")
        finally:
            for t in sessions.values():
                await t.__aexit__(None, None, None)

    asyncio.run(main())
    crl = x509.load_pem_x509_crl(ident.crl_pem().encode())
    for d in ("ri-1", "ri-2"):
        serial = x509.load_pem_x509_certificate(
            (old[d].client_certificate or "").encode()
        ).serial_number
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert {d.device_id: d.group for d in client.devices.find()} == dict.fromkeys(old, "lab")

    # refused whole: nothing written, nothing reloaded
    client.revoke_device("ri-3")
    version, reloads = ident.version(), broker.broker.reloads
    records = (ident.directory / "credentials.json").read_bytes()
    with pytest.raises(NotFound, match=r"1 of these devices are not enrolled: 'ghost'"):
        client.reissue_devices(["ri-1", "ghost"])
    with pytest.raises(Conflict, match=r"1 of these devices are revoked: 'ri-3'.*new id"):
        client.reissue_devices(["ri-1", "ri-3"])
    with pytest.raises(InvalidArgument, match=r"'ri-1' is listed twice.*nothing was reissued"):
        client.reissue_devices(["ri-1", "ri-1"])
    assert ident.version() == version and broker.broker.reloads == reloads
    assert (ident.directory / "credentials.json").read_bytes() == records
