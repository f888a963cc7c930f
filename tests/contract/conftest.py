"""Real services on loopback for the contract suites: PostgreSQL, moto's S3, temp dirs.

- `postgres_url`: a throwaway PostgreSQL cluster (initdb + pg_ctl) on a free
  127.0.0.1 port, or the server named by `FLEET_TEST_DB_URL`.
- `s3`: moto's ThreadedMotoServer on a free 127.0.0.1 port with one bucket.
- `registry` / `registry_url`: SQLite file in `tmp_path` or a fresh PostgreSQL database.
- `store`: the local (file://) or S3 artifact store, each test under its own root/prefix.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.cloud.artifacts import ArtifactStore, open_artifact_store
from edgefleet.cloud.registry import RegistryStore, open_registry
from tests.support.postgres import PostgresUnavailable, TempPostgres

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


def _no_postgres(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI but unavailable: {why}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable ({why}); install postgresql or set FLEET_TEST_DB_URL")


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
    server = TempPostgres()
    try:
        url = server.__enter__()
    except PostgresUnavailable as e:
        _no_postgres(str(e))
        return
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


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
