"""A throwaway PostgreSQL cluster on a free loopback port (initdb + pg_ctl).

Used by the contract fixtures and by `bench/` (telemetry ingest into PostgreSQL).
Raises `PostgresUnavailable` with the reason when the binaries or the `postgres`
system user (needed when running as root) are missing, or the server won't start.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

PG_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path | None:
    found = [shutil.which("initdb"), shutil.which("pg_ctl")]
    if all(found):
        return Path(found[0]).resolve().parent  # type: ignore[arg-type]

    def major(path: str) -> int:
        part = Path(path).parent.parent.name
        return int(part) if part.isdigit() else 0

    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major, reverse=True):
        bindir = Path(initdb).parent
        if (bindir / "pg_ctl").exists():
            return bindir
    return None


def wait_accepting(url: str, deadline_s: float) -> None:
    import psycopg

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class TempPostgres:
    """``with TempPostgres() as url:`` a server with database `database` for the block.

    `durable=False` turns fsync and synchronous commit off (tests); benchmarks keep
    the defaults so their figures mean something.
    """

    def __init__(self, *, database: str = "fleet_test", durable: bool = False) -> None:
        self.database = database
        self.durable = durable
        self.url = ""
        self._root: Path | None = None
        self._started = False
        self._as_user: list[str] = []
        self._bindir: Path | None = None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as_user, *args],
            cwd=self._root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def __enter__(self) -> str:
        bindir = pg_bindir()
        if bindir is None:
            raise PostgresUnavailable("initdb/pg_ctl not on PATH nor in /usr/lib/postgresql/*/bin")
        self._bindir = bindir
        uid = gid = -1
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                pw = pwd.getpwnam(PG_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root and there is no {PG_USER!r} system user"
                ) from None
            uid, gid = pw.pw_uid, pw.pw_gid
            self._as_user = ["runuser", "-u", PG_USER, "--"]
        # Not under pytest's tmp dirs: /tmp/pytest-of-root is 0700, unreadable for `postgres`.
        root = self._root = Path(tempfile.mkdtemp(prefix="fleet-pg-", dir="/tmp"))
        data, log = root / "data", root / "server.log"
        if uid >= 0:
            os.chown(root, uid, gid)
        try:
            r = self._run(
                str(bindir / "initdb"),
                "-D", str(data),
                "-U", PG_USER,
                "-A", "trust",
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
            )  # fmt: skip
            if r.returncode != 0:
                raise PostgresUnavailable(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")
            port = 0
            for _ in range(3):  # another process may grab the free port before the server binds
                port = free_port()
                opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root}"
                if not self.durable:
                    opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                r = self._run(
                    str(bindir / "pg_ctl"),
                    "start",
                    "-D", str(data),
                    "-l", str(log),
                    "-w",
                    "-t", "60",
                    "-o", opts,
                )  # fmt: skip
                if r.returncode == 0:
                    self._started = True
                    break
            if not self._started:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise PostgresUnavailable(f"pg_ctl start failed: {r.stderr.strip()}\n{tail}")
            admin = f"postgresql://{PG_USER}@127.0.0.1:{port}/postgres"
            wait_accepting(admin, 30)
            import psycopg

            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.database}"')
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.url = f"postgresql://{PG_USER}@127.0.0.1:{port}/{self.database}"
        return self.url

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._started and self._bindir is not None and self._root is not None:
            self._run(
                str(self._bindir / "pg_ctl"), "stop", "-D", str(self._root / "data"),
                "-m", "fast", "-w", "-t", "30",
            )  # fmt: skip
            self._started = False
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
