"""`fleet init`: make FLEET_HOME (keys, token, config, database schema)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from edgefleet.cloud.access import AccessStore
from edgefleet.cloud.access.model import ADMIN, ADMIN_TOKEN_NAME
from edgefleet.cloud.config import CloudSettings, write_config
from edgefleet.cloud.db import Database, normalize_url
from edgefleet.cloud.home import secure_home
from edgefleet.cloud.services.values import InitResult
from edgefleet.cloud.services.wiring import Services
from edgefleet.cloud.signing import create_keypair, load_public
from edgefleet.protos.errors import Unauthenticated, Unavailable
from edgefleet.protos.manifest import key_id

logger = logging.getLogger(__name__)


def init_home(services: Services, *, root_passphrase: bytes | None = None) -> InitResult:
    """Create FLEET_HOME; everything made here is private to its owner (umask 077)."""
    old = os.umask(0o077)
    try:
        return _init(services, root_passphrase=root_passphrase)
    finally:
        os.umask(old)


def _init(services: Services, *, root_passphrase: bytes | None) -> InitResult:
    s = services.settings
    fresh = not s.home_dir.exists()
    try:
        s.home_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise Unavailable(f"cannot create FLEET_HOME {s.home_dir}: {e.strerror}") from None
    try:
        # check the stores before writing anything: a bad URL leaves nothing behind;
        # an empty database gets the current schema (migrations), an old one is refused
        services.artifacts.check()
        Database(s.registry_url).close()
        created = create_keypair(s.signing_key_path, s.public_key_path, passphrase=s.passphrase)
        keyring = services.keyring
        created_root = keyring.ensure(passphrase=root_passphrase)
        created_token = create_token(s.token_path)
        ensure_admin_token(s, services.access)
        cfg = write_config(s)
        secure_home(s)
    except BaseException:
        if fresh:  # a failed first init leaves no half-made FLEET_HOME behind
            services.close()
            shutil.rmtree(s.home_dir, ignore_errors=True)
        raise
    return InitResult(
        home=s.home_dir,
        created_key=created,
        key_id=key_id(load_public(s.public_key_path)),
        registry=redact(s.registry_url),
        artifacts=s.artifacts,
        config=cfg,
        created_token=created_token,
        root_key_id=key_id(keyring.root_public()),
        created_root=created_root,
    )


def create_token(path: Path) -> bool:
    """Write a new API token (32 random bytes, urlsafe, mode 0600) unless one exists."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return True


def ensure_admin_token(settings: CloudSettings, store: AccessStore) -> bool:
    """Make FLEET_HOME/keys/token the admin token named `admin` in the database, unless a
    token of that name exists (also a revoked one); whether it did."""
    if not settings.token_path.exists():
        return False
    secret = read_token(settings.token_path)
    made = store.ensure_token(ADMIN_TOKEN_NAME, ADMIN, secret, created_by="fleet init")
    token = store.authenticate(secret)
    if made:
        logger.info("%s registered as the admin token %r", settings.token_path, ADMIN_TOKEN_NAME)
    elif token is None or not token.active:
        logger.warning(
            "%s is not an active token of this coordinator (token %r has another secret or was "
            "revoked): on this host, 'fleet tokens create NAME --role admin' makes a new one",
            settings.token_path,
            ADMIN_TOKEN_NAME,
        )
    return made


def read_token(path: Path) -> str:
    """The API token in `path` (FLEET_HOME/keys/token, or --token-file)."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise Unauthenticated(
            f"no API token at {path}: run 'fleet init' there, or pass --token / FLEET_TOKEN"
        ) from None
    except OSError as e:
        raise Unauthenticated(f"cannot read API token {path}: {e.strerror}") from None
    if not token:
        raise Unauthenticated(f"API token file {path} is empty: run 'fleet init' to recreate it")
    return token


def redact(url: str) -> str:
    return normalize_url(url).render_as_string(hide_password=True)
