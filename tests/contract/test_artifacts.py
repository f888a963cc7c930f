"""ArtifactStore contract: one suite, run against the local (file://) and S3 stores."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from edgefleet.cloud.artifacts import ArtifactStore, BlobRef, digest, open_artifact_store
from edgefleet.protos.errors import DataLoss, InvalidArgument, NotFound, Unavailable

# -- helpers --------------------------------------------------------------------------


def blob(size: int = 4096, seed: str = "") -> bytes:
    """Deterministic, distinct bytes per (size, seed): no two tests share a digest by accident."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{size}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


def stored_keys(store: ArtifactStore, store_kind: str, request: pytest.FixtureRequest) -> list[str]:
    """Every object the store keeps, read behind its back (temp files included)."""
    if store_kind == "local":
        root = Path(urlparse(store.uri).path)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    srv: Any = request.getfixturevalue("s3")
    prefix = urlparse(store.uri).path.strip("/") + "/"
    resp = srv.client().list_objects_v2(Bucket=srv.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def write_count(
    store: ArtifactStore, store_kind: str, request: pytest.FixtureRequest, key: str
) -> object:
    """Something that changes whenever the object is written again."""
    if store_kind == "local":
        st = (Path(urlparse(store.uri).path) / key).stat()
        return (st.st_ino, st.st_mtime_ns)  # writes go through a temp file + rename
    srv: Any = request.getfixturevalue("s3")  # the bucket is versioned: one version per write
    resp = srv.client().list_object_versions(Bucket=srv.bucket, Prefix=key)
    return len(resp.get("Versions", []))


@pytest.fixture
def overwrite(
    store: ArtifactStore, store_kind: str, request: pytest.FixtureRequest
) -> Callable[[str, bytes], None]:
    """Replace a stored blob's bytes behind the store's back (disk rot, a bad actor)."""

    def local(sha: str, data: bytes) -> None:
        # layout: ROOT/ab/abcdef…
        path = Path(urlparse(store.uri).path) / sha[:2] / sha
        assert path.is_file(), f"expected the blob at {path}"
        path.write_bytes(data)

    def s3(sha: str, data: bytes) -> None:
        srv: Any = request.getfixturevalue("s3")
        client = srv.client()
        # layout: PREFIX/sha256/ab/abcdef…
        key = f"{urlparse(store.uri).path.strip('/')}/sha256/{sha[:2]}/{sha}"
        client.head_object(Bucket=srv.bucket, Key=key)  # the blob really lives there
        client.put_object(Bucket=srv.bucket, Key=key, Body=data)

    return local if store_kind == "local" else s3


# -- put / get / exists / delete --------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100_000])
def test_put_get_roundtrip(store: ArtifactStore, size: int) -> None:
    data = blob(size, "roundtrip")
    ref = store.put(data)
    assert ref == BlobRef(hashlib.sha256(data).hexdigest(), size)
    assert ref.sha256 == digest(data)
    assert store.exists(ref.sha256)
    assert store.get(ref.sha256) == data


def test_put_is_idempotent_and_stores_once(
    store: ArtifactStore, store_kind: str, request: pytest.FixtureRequest
) -> None:
    data = blob(2048, "idem")
    first = store.put(data)
    keys = stored_keys(store, store_kind, request)
    assert len(keys) == 1 and keys[0].endswith(first.sha256)

    writes_before = write_count(store, store_kind, request, keys[0])
    second = store.put(data)
    assert second == first
    assert stored_keys(store, store_kind, request) == keys  # no second copy, no temp file
    assert write_count(store, store_kind, request, keys[0]) == writes_before  # not rewritten
    assert store.get(first.sha256) == data


def test_distinct_blobs_are_kept_apart(store: ArtifactStore) -> None:
    a, b = blob(512, "a"), blob(512, "b")
    ra, rb = store.put(a), store.put(b)
    assert ra.sha256 != rb.sha256
    assert (store.get(ra.sha256), store.get(rb.sha256)) == (a, b)


def test_exists_is_false_for_unknown_blob(store: ArtifactStore) -> None:
    assert store.exists(digest(b"never stored")) is False


def test_get_unknown_blob_is_not_found(store: ArtifactStore) -> None:
    sha = digest(b"never stored")
    with pytest.raises(NotFound, match=re.escape(f"blob {sha[:16]}") + ".*not in artifact store"):
        store.get(sha)


@pytest.mark.parametrize(
    "bad",
    [
        "abc",
        "A" * 64,  # uppercase
        "g" * 64,  # not hex
        "a" * 63,
        "a" * 65,
        "../" + "a" * 61,
        "",
    ],
)
def test_malformed_blob_id_is_invalid(store: ArtifactStore, bad: str) -> None:
    match = re.escape(f"blob id {bad!r} is not a sha256 hex digest")
    with pytest.raises(InvalidArgument, match=match):
        store.get(bad)
    with pytest.raises(InvalidArgument, match=match):
        store.exists(bad)
    with pytest.raises(InvalidArgument, match=match):
        store.delete(bad)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: bytes([d[0] ^ 0xFF]) + d[1:], id="bitflip"),
        pytest.param(lambda d: d[: len(d) // 2], id="truncated"),
        pytest.param(lambda d: b"", id="emptied"),
        pytest.param(lambda d: d + b"\x00", id="appended"),
    ],
)
def test_altered_blob_is_data_loss_never_served(
    store: ArtifactStore, overwrite: Callable[[str, bytes], None], tamper: Callable[[bytes], bytes]
) -> None:
    data = blob(4096, "tamper")
    ref = store.put(data)
    bad = tamper(data)
    overwrite(ref.sha256, bad)

    with pytest.raises(
        DataLoss, match=re.escape(f"blob {ref.sha256[:16]}") + ".*now hashes to"
    ) as ei:
        store.get(ref.sha256)
    assert digest(bad)[:16] in str(ei.value)  # names what it got instead


def test_delete_removes_the_blob_and_is_idempotent(
    store: ArtifactStore, store_kind: str, request: pytest.FixtureRequest
) -> None:
    keep, gone = store.put(blob(300, "keep")), store.put(blob(300, "gone"))
    store.delete(gone.sha256)
    assert not store.exists(gone.sha256)
    with pytest.raises(NotFound):
        store.get(gone.sha256)
    store.delete(gone.sha256)  # deleting twice is fine
    assert store.get(keep.sha256) == blob(300, "keep")
    assert [k for k in stored_keys(store, store_kind, request) if k.endswith(gone.sha256)] == []

    again = store.put(blob(300, "gone"))  # and the blob can be stored again
    assert again == gone and store.get(gone.sha256) == blob(300, "gone")


def test_check_passes_on_a_reachable_store(store: ArtifactStore) -> None:
    store.check()  # raises on failure
    assert store.put(b"ok").size == 2


# -- opening --------------------------------------------------------------------------


def test_unknown_scheme_is_invalid_and_lists_supported() -> None:
    with pytest.raises(
        InvalidArgument,
        match=re.escape("No artifact store for 'gs://b/m.onnx'; supported: file, s3"),
    ):
        open_artifact_store("gs://b/m.onnx")


def test_plain_path_opens_a_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_artifact_store("blobs")
    ref = store.put(b"plain path")
    assert store.get(ref.sha256) == b"plain path"
    assert (tmp_path / "blobs" / ref.sha256[:2] / ref.sha256).is_file()


def test_s3_uri_without_bucket_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="no bucket; expected s3://BUCKET"):
        open_artifact_store("s3:///prefix", s3_endpoint_url="http://127.0.0.1:1")


@pytest.mark.usefixtures("aws_env")
def test_s3_unreachable_endpoint_is_unavailable() -> None:
    endpoint = "http://127.0.0.1:1"  # port 1: nothing listens
    store = open_artifact_store("s3://fleet/models", s3_endpoint_url=endpoint)
    sha = digest(b"x")
    for call in (store.check, lambda: store.get(sha), lambda: store.put(b"x")):
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=re.escape(f"cannot reach {endpoint}")):
            call()
        assert time.monotonic() - t0 < 20


def test_s3_nonexistent_bucket_is_not_found(s3: Any) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    store = open_artifact_store(f"s3://{bucket}/p", s3_endpoint_url=s3.endpoint)
    with pytest.raises(
        NotFound, match=f"bucket '{bucket}' does not exist at {re.escape(s3.endpoint)}"
    ):
        store.get(digest(b"x"))
    with pytest.raises(NotFound, match=f"bucket '{bucket}' does not exist"):
        store.put(b"x")
    with pytest.raises(NotFound, match=bucket):
        store.check()


def test_s3_check_says_the_bucket_is_missing(s3: Any) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    store = open_artifact_store(f"s3://{bucket}", s3_endpoint_url=s3.endpoint)
    with pytest.raises(
        NotFound, match=f"bucket '{bucket}' does not exist at {re.escape(s3.endpoint)}"
    ):
        store.check()


def test_stores_do_not_see_each_others_prefixes(s3: Any) -> None:
    a = open_artifact_store(
        f"s3://{s3.bucket}/a-{uuid.uuid4().hex[:8]}", s3_endpoint_url=s3.endpoint
    )
    b = open_artifact_store(
        f"s3://{s3.bucket}/b-{uuid.uuid4().hex[:8]}", s3_endpoint_url=s3.endpoint
    )
    ref = a.put(b"only in a")
    assert a.exists(ref.sha256) and not b.exists(ref.sha256)
    with pytest.raises(NotFound):
        b.get(ref.sha256)


def test_local_store_leaves_no_temp_files(tmp_path: Path) -> None:
    store = open_artifact_store((tmp_path / "s").as_uri())
    for i in range(5):
        store.put(blob(1000, str(i)))
    names = [p.name for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert len(names) == 5
    assert not [n for n in names if n.startswith(".tmp-")]
    assert os.listdir(tmp_path / "s")  # fan-out dirs exist
