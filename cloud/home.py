"""Secrets at rest in FLEET_HOME: who may read what.

FLEET_HOME and its key folders are 0700; the database, config, serve.json, token,
TLS and signing keys 0600. `secure_home` sets these on every `fleet init` and
`fleet serve` start (logging each mode it had to tighten), so a home made by an
older version, or copied with a loose umask, is fixed before secrets are used.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from edgefleet.cloud.config import CONFIG_FILE, SERVE_FILE, CloudSettings

logger = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def _tighten(path: Path, mode: int) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) & ~mode == 0:
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
    logger.warning("%s was mode %o; now %o", path, stat.S_IMODE(st.st_mode), mode)
    return True


def private_files(settings: CloudSettings) -> list[Path]:
    """Files under FLEET_HOME no one but the owner may read."""
    home = settings.home_dir
    files = [home / CONFIG_FILE, home / SERVE_FILE, settings.signing_key_path, settings.token_path]
    db = home / "registry.db"
    files += [db, db.with_name("registry.db-wal"), db.with_name("registry.db-shm")]
    for folder in (settings.grpc_tls_dir, settings.fl_dir / "tls"):
        if folder.is_dir():
            files += [p for p in folder.iterdir() if p.suffix == ".key"]
    return files


def secure_home(settings: CloudSettings) -> int:
    """Set FLEET_HOME's modes (see module doc); how many paths had to be tightened."""
    home = settings.home_dir
    changed = 0
    for folder in (home, settings.signing_key_path.parent, settings.grpc_tls_dir):
        changed += _tighten(folder, PRIVATE_DIR)
    for f in private_files(settings):
        changed += _tighten(f, PRIVATE_FILE)
    return changed
