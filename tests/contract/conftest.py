"""Real services on loopback for the contract suites: PostgreSQL, moto's S3, temp dirs.

- `postgres_url`: a throwaway PostgreSQL cluster (initdb + pg_ctl) on a free
  127.0.0.1 port, or the server named by `FLEET_TEST_DB_URL`.
- `s3`: moto's ThreadedMotoServer on a free 127.0.0.1 port with one bucket.
- `registry` / `registry_url`: SQLite file in `tmp_path` or a fresh PostgreSQL database.
- `store`: the local (file://) or S3 artifact store, each test under its own root/prefix.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud.artifacts import ArtifactStore, open_artifact_store
from cloud.registry import RegistryStore, open_registry

_PG_USER = "postgres"
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_UNSET = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_aws_env(mp: pytest.MonkeyPatch) -> None:
    for k, v in _AWS_ENV.items():
        mp.setenv(k, v)
    for k in _AWS_UNSET:
        mp.delenv(k, raising=False)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake AWS credentials so boto3 signs requests without touching real accounts."""
    _set_aws_env(monkeypatch)


# -- PostgreSQL -----------------------------------------------------------------------


def _pg_bindir() -> Path | None:
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


def _no_postgres(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI but unavailable: {why}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable ({why}); install postgresql or set FLEET_TEST_DB_URL")


def _wait_accepting(url: str, deadline_s: float) -> None:
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


def _psycopg_url(url: str) -> str:
    """A libpq URI for psycopg from a SQLAlchemy-style URL (drops `+driver`)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a database on a PostgreSQL server that lives for the whole session."""
    override = os.environ.get("FLEET_TEST_DB_URL", "")
    if override:
        if not override.startswith(("postgresql", "postgres")):
            pytest.fail(
                f"FLEET_TEST_DB_URL={override!r}: the postgres fixtures need a postgresql:// URL",
                pytrace=False,
            )
        yield override
        return

    bindir = _pg_bindir()
    if bindir is None:
        _no_postgres("initdb/pg_ctl not on PATH nor in /usr/lib/postgresql/*/bin")
    assert bindir is not None

    as_user: list[str] = []
    uid = gid = -1
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pw = pwd.getpwnam(_PG_USER)
        except KeyError:
            _no_postgres(f"running as root and there is no {_PG_USER!r} system user")
        uid, gid = pw.pw_uid, pw.pw_gid
        as_user = ["runuser", "-u", _PG_USER, "--"]

    # Not under pytest's tmp dirs: /tmp/pytest-of-root is 0700, unreadable for `postgres`.
    root = Path(tempfile.mkdtemp(prefix="fleet-pg-", dir="/tmp"))
    data = root / "data"
    log = root / "server.log"
    if uid >= 0:
        os.chown(root, uid, gid)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user, *args], cwd=root, capture_output=True, text=True, timeout=120, check=False
        )

    started = False
    try:
        r = run(
            str(bindir / "initdb"),
            "-D", str(data),
            "-U", _PG_USER,
            "-A", "trust",
            "-E", "UTF8",
            "--no-locale",
            "--no-sync",
        )  # fmt: skip
        if r.returncode != 0:
            _no_postgres(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")

        port = 0
        for _ in range(3):  # another process may grab the free port before the server binds it
            port = free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            r = run(
                str(bindir / "pg_ctl"),
                "start",
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                opts,
            )
            if r.returncode == 0:
                started = True
                break
        if not started:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"pg_ctl start failed: {r.stderr.strip()}\n{tail}", pytrace=False)

        admin = f"postgresql://{_PG_USER}@127.0.0.1:{port}/postgres"
        _wait_accepting(admin, 30)
        import psycopg

        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE fleet_test")
        yield f"postgresql://{_PG_USER}@127.0.0.1:{port}/fleet_test"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    """CREATE a uniquely named database on `base_url`'s server; DROP it afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"fleet_{uuid.uuid4().hex[:16]}"
    admin = _psycopg_url(base_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- registry -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty registry database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    base = request.getfixturevalue("postgres_url")
    with fresh_database(base) as url:
        yield url


@pytest.fixture
def registry(registry_url: str) -> Iterator[RegistryStore]:
    reg = open_registry(registry_url)
    try:
        yield reg
    finally:
        reg.close()


# -- S3 (moto) ------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 on a free loopback port, one bucket, fake credentials in the env."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        _set_aws_env(mp)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            srv = S3Server(endpoint=f"http://{host}:{port}", bucket="fleet-artifacts")
            client = srv.client()
            client.create_bucket(Bucket=srv.bucket)
            # versioned, so tests can tell a rewrite from a skipped write
            client.put_bucket_versioning(
                Bucket=srv.bucket, VersioningConfiguration={"Status": "Enabled"}
            )
            yield srv
        finally:
            server.stop()


# -- artifact stores ------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(store_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """An empty artifact store: its own directory, or its own prefix in the moto bucket."""
    if store_kind == "local":
        return open_artifact_store((tmp_path / "artifacts").as_uri())
    srv: S3Server = request.getfixturevalue("s3")
    return open_artifact_store(
        f"s3://{srv.bucket}/t-{uuid.uuid4().hex[:12]}", s3_endpoint_url=srv.endpoint
    )
