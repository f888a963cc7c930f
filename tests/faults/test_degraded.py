"""Degraded storage: a read-only registry still answers reads and refuses writes in one
line; a full disk gives one line `error (unavailable): … no space left on …` and leaves
nothing half-written.

FLEET_HOME lives on a tmpfs this test mounts (1 MiB for the full disk), remounted
read-only for the read-only case; it needs root and mount permission, and is skipped,
saying so, without them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.cloud.artifacts.local import LocalArtifactStore
from edgefleet.protos.errors import Unavailable
from tests.conftest import Cli


def _onnx(path: Path, outputs: int) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(outputs).standard_normal((64, outputs)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, outputs])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


class Mount:
    def __init__(self, path: Path) -> None:
        self.path = path

    def remount(self, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(self.path)], check=True)

    def fill(self) -> None:
        """Write a filler file until the disk says it is full."""
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Mount]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {r.stderr}")
    try:
        yield Mount(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        # SQLite's own -wal/-shm come and go with every connection: not registry content
        if p.name != "filler" and p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


def _one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error (unavailable): "), err
    for w in words:
        assert w in lines[0], (w, err)


def test_read_only_registry_reads_work_writes_say_why(cli: Cli, tmp_path: Path) -> None:
    small, other = _onnx(tmp_path / "small.onnx", 10), _onnx(tmp_path / "other.onnx", 12)
    with tmpfs(tmp_path / "mnt", "16m") as m:
        home = str(m.path / "home")
        assert cli("--home", home, "init").code == 0
        assert cli("--home", home, "models", "import", str(small), "--name", "small").code == 0
        m.remount("ro")
        ls = cli("--home", home, "models", "ls")
        assert ls.code == 0 and "small" in ls.out, ls
        show = cli("--home", home, "models", "show", "small")
        assert show.code == 0 and "fp32" in show.out, show
        before = _files(m.path)
        for args in (
            ("models", "import", str(small), "--name", "again"),  # blob stored: the database says
            ("models", "import", str(other), "--name", "other"),  # a new blob: the store says
        ):
            r = cli("--home", home, *args)
            assert r.code == 1
            _one_line_error(r.err)
            assert "read-only" in r.err, r.err
        assert _files(m.path) == before
        assert cli("--home", home, "models", "ls").out == ls.out


def test_full_disk_import_is_one_line_and_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    small, big = _onnx(tmp_path / "small.onnx", 10), _onnx(tmp_path / "big.onnx", 12)
    with tmpfs(tmp_path / "mnt", "1m") as m:
        home = str(m.path / "home")
        assert cli("--home", home, "init").code == 0
        assert cli("--home", home, "models", "import", str(small), "--name", "small").code == 0
        ls = cli("--home", home, "models", "ls", "--json").out
        m.fill()
        before = _files(m.path)
        r = cli("--home", home, "models", "import", str(big), "--name", "big")
        assert r.code == 1
        _one_line_error(r.err, "no space left on device")  # whichever write came first
        assert _files(m.path) == before  # no temporary file, no half blob
        assert not list((m.path / "home").rglob(".tmp-*"))
        # the artifact store itself, past the database
        store = LocalArtifactStore(str(m.path / "home" / "artifacts"))
        with pytest.raises(Unavailable, match=r"cannot store blob .*: no space left on device"):
            store.put(big.read_bytes())
        assert _files(m.path) == before
        (m.path / "filler").unlink()  # space again: the registry is as it was
        assert cli("--home", home, "models", "ls", "--json").out == ls


@pytest.mark.slow
def test_full_disk_train_is_one_line_unavailable(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tmpfs(tmp_path / "mnt", "1m") as m:
        home = str(m.path / "home")
        assert cli("--home", home, "init").code == 0
        ls = cli("--home", home, "models", "ls", "--json").out
        scratch = m.path / "tmp"
        scratch.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # TMPDIR on the full disk too
        m.fill()
        before = _files(m.path)
        r = cli("--home", home, "train", "-m", "digits", "--data", "digits", "--epochs", "1")
        assert r.code == 1
        _one_line_error(r.err, "no space left on device")
        assert _files(m.path) == before
        (m.path / "filler").unlink()
        assert cli("--home", home, "models", "ls", "--json").out == ls
