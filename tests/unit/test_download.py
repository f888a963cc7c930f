"""Resumable chunked downloads on disk (agent.download.PartialDownload)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.download import PartialDownload
from edgefleet.protos.errors import Conflict, DataLoss, InvalidArgument

CHUNK = 16 * 1024


def make_artifact(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def digests(data: bytes, chunk_size: int = CHUNK) -> list[bytes]:
    return [
        hashlib.sha256(data[i : i + chunk_size]).digest() for i in range(0, len(data), chunk_size)
    ]


def chunk(data: bytes, index: int, chunk_size: int = CHUNK) -> bytes:
    return data[index * chunk_size : (index + 1) * chunk_size]


def open_for(directory: Path, data: bytes, chunk_size: int = CHUNK, **kw: bool) -> PartialDownload:
    return PartialDownload.open(
        directory,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_size=chunk_size,
        chunk_digests=digests(data, chunk_size),
        **kw,
    )


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records() -> Iterator[Records]:
    """Log records of agent.download (works with `-p no:logging`, unlike caplog)."""
    log = logging.getLogger("edgefleet.agent.download")
    handler, old_level = Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield handler
    log.removeHandler(handler)
    log.setLevel(old_level)


ART = make_artifact(64 * CHUNK)  # 1 MiB: 64 chunks
SHORT = make_artifact(5 * CHUNK + 1000, seed=2)  # 6 chunks, the last 1000 bytes


def test_fresh_download_preallocates_and_wants_everything(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    assert pd.chunks_total == 64
    assert pd.chunks_have == 0
    assert not pd.complete
    assert pd.missing_ranges() == [(0, 64)]
    assert pd.part_path.stat().st_size == len(ART)
    assert pd.bitmap_path.exists()


def test_in_order_download_finishes_to_exact_bytes(tmp_path: Path) -> None:
    pd = open_for(tmp_path / "dl", ART)
    for i in range(64):
        assert pd.add(i, chunk(ART, i)) is True
    assert pd.complete
    assert pd.missing_ranges() == []
    dest = tmp_path / "models" / "m.onnx"
    assert pd.finish(dest) == dest
    assert dest.read_bytes() == ART
    assert not pd.part_path.exists()
    assert not pd.bitmap_path.exists()
    with pytest.raises(Conflict, match="already finished"):
        pd.add(0, chunk(ART, 0))


def test_out_of_order_chunks_and_missing_ranges(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    for i in (1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 63):
        pd.add(i, chunk(ART, i))
    assert pd.chunks_have == 12
    assert pd.missing_ranges() == [(0, 1), (3, 5), (6, 8), (16, 63)]
    assert pd.missing_ranges(limit=2) == [(0, 1), (3, 5)]
    assert pd.has(5) and not pd.has(4)
    order = [i for i in range(64) if not pd.has(i)]
    random.Random(7).shuffle(order)
    for i in order:
        pd.add(i, chunk(ART, i))
    assert pd.finish(tmp_path / "out").read_bytes() == ART


def test_missing_limit_must_be_positive(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    with pytest.raises(InvalidArgument, match="limit 0"):
        pd.missing_ranges(limit=0)


def test_duplicate_chunk_is_not_rewritten(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    assert pd.add(3, chunk(ART, 3)) is True
    assert pd.add(3, chunk(ART, 3)) is False
    # a chunk already held is neither hashed nor written again
    assert pd.add(3, b"\xff" * CHUNK) is False
    assert pd.chunks_have == 1
    with pd.part_path.open("rb") as f:
        f.seek(3 * CHUNK)
        assert f.read(CHUNK) == chunk(ART, 3)


def test_tampered_chunk_is_rejected_and_not_stored(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    bad = bytearray(chunk(ART, 3))
    bad[100] ^= 0x01
    with pytest.raises(DataLoss, match=r"chunk 3 .*expected [0-9a-f]{16}…"):
        pd.add(3, bytes(bad))
    with pytest.raises(DataLoss, match="chunk 4 .* is 100 bytes; expected 16384"):
        pd.add(4, chunk(ART, 4)[:100])
    assert not pd.has(3)
    assert pd.chunks_have == 0
    with pd.part_path.open("rb") as f:
        f.seek(3 * CHUNK)
        assert f.read(CHUNK) == bytes(CHUNK)
    # the genuine chunk is still accepted afterwards
    assert pd.add(3, chunk(ART, 3)) is True


def test_index_out_of_range(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    with pytest.raises(InvalidArgument, match="chunk index 64 .*valid: 0 … 63"):
        pd.add(64, chunk(ART, 0))
    with pytest.raises(InvalidArgument, match="chunk index -1"):
        pd.has(-1)


def test_last_chunk_is_short(tmp_path: Path) -> None:
    pd = open_for(tmp_path, SHORT)
    assert pd.chunks_total == 6
    with pytest.raises(DataLoss, match="chunk 5 .* is 16384 bytes; expected 1000"):
        pd.add(5, chunk(SHORT, 5) + bytes(CHUNK - 1000))
    assert pd.add(5, chunk(SHORT, 5)) is True
    for i in range(5):
        pd.add(i, chunk(SHORT, i))
    assert pd.finish(tmp_path / "m.tflite").read_bytes() == SHORT


def test_resume_after_restart_keeps_chunks(tmp_path: Path, records: Records) -> None:
    pd = open_for(tmp_path, ART)
    for i in range(0, 64, 2):
        pd.add(i, chunk(ART, i))
    del pd  # "restart": nothing is held in memory any more

    again = open_for(tmp_path, ART)
    assert again.chunks_have == 32
    assert all(again.has(i) == (i % 2 == 0) for i in range(64))
    assert again.missing_ranges(limit=2) == [(1, 2), (3, 4)]
    assert any("resuming download" in m for m in records.messages)
    for i in range(1, 64, 2):
        again.add(i, chunk(ART, i))
    assert again.finish(tmp_path / "m").read_bytes() == ART


def test_bit_is_on_disk_after_each_chunk(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    pd.add(10, chunk(ART, 10))
    bitmap = pd.bitmap_path.read_bytes()
    assert bitmap[-8:] == bytes([0, 0b100, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("chunk_size", "chunk size 16384 -> 8192"),
        ("digests", "different chunk digests"),
    ],
)
def test_parameter_change_discards_partial_state(
    tmp_path: Path, records: Records, change: str, reason: str
) -> None:
    sha = hashlib.sha256(ART).hexdigest()
    pd = open_for(tmp_path, ART)
    for i in range(10):
        pd.add(i, chunk(ART, i))
    if change == "chunk_size":
        again = open_for(tmp_path, ART, chunk_size=CHUNK // 2)
        assert again.chunks_total == 128
    else:
        wrong = digests(ART)
        wrong[0] = bytes(32)
        again = PartialDownload.open(
            tmp_path, sha256=sha, size=len(ART), chunk_size=CHUNK, chunk_digests=wrong
        )
    assert again.chunks_have == 0
    assert again.missing_ranges() == [(0, again.chunks_total)]
    assert any("discarding partial download" in m and reason in m for m in records.messages)


def test_size_change_discards(tmp_path: Path) -> None:
    sha = hashlib.sha256(ART).hexdigest()
    pd = open_for(tmp_path, ART)
    pd.add(0, chunk(ART, 0))
    smaller = ART[: 10 * CHUNK]
    again = PartialDownload.open(
        tmp_path, sha256=sha, size=len(smaller), chunk_size=CHUNK, chunk_digests=digests(smaller)
    )
    assert again.chunks_have == 0
    assert again.part_path.stat().st_size == len(smaller)


def test_damaged_or_orphaned_state_starts_over(tmp_path: Path, records: Records) -> None:
    pd = open_for(tmp_path, ART)
    pd.add(0, chunk(ART, 0))
    pd.bitmap_path.write_bytes(pd.bitmap_path.read_bytes()[:20])  # torn header
    assert open_for(tmp_path, ART).chunks_have == 0
    assert any("bitmap file is damaged" in m for m in records.messages)

    pd = open_for(tmp_path, ART)
    pd.add(0, chunk(ART, 0))
    pd.part_path.unlink()
    assert open_for(tmp_path, ART).chunks_have == 0
    assert any("bitmap without a data file" in m for m in records.messages)

    pd = open_for(tmp_path, ART)
    pd.add(0, chunk(ART, 0))
    pd.bitmap_path.unlink()
    assert open_for(tmp_path, ART).chunks_have == 0
    assert any("data file without a bitmap" in m for m in records.messages)


def test_finish_detects_corrupted_part_and_refetches_that_chunk(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    for i in range(64):
        pd.add(i, chunk(ART, i))
    with pd.part_path.open("r+b") as f:  # flip one byte behind its back
        f.seek(5 * CHUNK + 123)
        b = f.read(1)
        f.seek(5 * CHUNK + 123)
        f.write(bytes([b[0] ^ 0xFF]))
    dest = tmp_path / "m.onnx"
    with pytest.raises(DataLoss, match=r"1 stored chunk\(s\) .*chunks 5\)"):
        pd.finish(dest)
    assert not dest.exists()
    assert not pd.complete
    assert pd.missing_ranges() == [(5, 6)]
    # the cleared bit is on disk too: a restart asks for chunk 5 again
    assert open_for(tmp_path, ART).missing_ranges() == [(5, 6)]
    assert pd.add(5, chunk(ART, 5)) is True
    assert pd.finish(dest).read_bytes() == ART


def test_finish_detects_truncated_part(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    for i in range(64):
        pd.add(i, chunk(ART, i))
    os.truncate(pd.part_path, 60 * CHUNK + 10)
    with pytest.raises(DataLoss, match="4 stored chunk"):
        pd.finish(tmp_path / "m")
    assert pd.missing_ranges() == [(60, 64)]
    assert pd.part_path.stat().st_size == len(ART)
    for i in range(60, 64):
        pd.add(i, chunk(ART, i))
    assert pd.finish(tmp_path / "m").read_bytes() == ART


def test_finish_rejects_digests_that_do_not_describe_the_artifact(tmp_path: Path) -> None:
    # every chunk matches its digest, but the whole is not the artifact named
    pd = PartialDownload.open(
        tmp_path,
        sha256=hashlib.sha256(b"something else").hexdigest(),
        size=len(SHORT),
        chunk_size=CHUNK,
        chunk_digests=digests(SHORT),
    )
    for i in range(6):
        pd.add(i, chunk(SHORT, i))
    with pytest.raises(DataLoss, match="chunk digests do not describe this artifact"):
        pd.finish(tmp_path / "m")
    assert pd.chunks_have == 0
    assert not (tmp_path / "m").exists()


def test_finish_requires_every_chunk(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    for i in range(2, 64):
        pd.add(i, chunk(ART, i))
    with pytest.raises(Conflict, match=r"2 of 64 chunks missing \(first ranges: \[0, 2\)\)"):
        pd.finish(tmp_path / "m")


def test_part_vanishing_mid_download_starts_over(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    pd.add(0, chunk(ART, 0))
    pd.part_path.unlink()
    assert pd.add(1, chunk(ART, 1)) is True
    assert pd.chunks_have == 1
    assert pd.missing_ranges(limit=1) == [(0, 1)]
    assert pd.part_path.stat().st_size == len(ART)


def test_discard_removes_state(tmp_path: Path) -> None:
    pd = open_for(tmp_path, ART)
    pd.add(0, chunk(ART, 0))
    pd.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Conflict, match="finished or discarded"):
        pd.add(1, chunk(ART, 1))
    assert open_for(tmp_path, ART).chunks_have == 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"sha256": "AB" * 32}, "sha256 'ABAB"),
        ({"sha256": "ab" * 31}, "is not 64 lowercase hex"),
        ({"chunk_size": 0}, "chunk size 0 must be positive"),
        ({"size": 0}, "size 0 must be positive"),
        ({"chunk_digests": [bytes(32)] * 3}, "3 chunk digests given; .* needs 64"),
        ({"chunk_digests": [b"short"] * 64}, "chunk digest 0 is 5 bytes"),
    ],
)
def test_open_validates_parameters(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "sha256": hashlib.sha256(ART).hexdigest(),
        "size": len(ART),
        "chunk_size": CHUNK,
        "chunk_digests": digests(ART),
    }
    args.update(kw)
    with pytest.raises(InvalidArgument, match=match):
        PartialDownload.open(tmp_path, **args)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_not_durable_mode_behaves_the_same(tmp_path: Path) -> None:
    pd = open_for(tmp_path, SHORT, durable=False)
    for i in reversed(range(6)):
        pd.add(i, chunk(SHORT, i))
    assert open_for(tmp_path, SHORT, durable=False).chunks_have == 6
    assert pd.finish(tmp_path / "m").read_bytes() == SHORT


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_no_file_handles_held_between_calls(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    downloads = [open_for(tmp_path / str(n), SHORT, durable=False) for n in range(200)]
    for pd in downloads:
        pd.add(0, chunk(SHORT, 0))
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(pd.chunks_have == 1 for pd in downloads)
