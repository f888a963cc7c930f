"""The keys this device trusts: built from its config, kept forward across restarts.

With a root key in the config (bundles from `fleet devices enroll` carry one) the
device holds a `KeyTrust` over the newest root-signed key list it has seen: the
bundle's, or a newer one received on `{prefix}/keys` and saved in
``STATE_DIR/keys.pb``. Without one it pins the single signing key of older bundles.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path

from edgefleet.protos.errors import FleetError, InvalidArgument
from edgefleet.protos.keys import KeyTrust, verify_key_list
from edgefleet.protos.manifest import load_public_key

logger = logging.getLogger(__name__)

KEYS_FILE = "keys.pb"


def load_trust(
    *, state_dir: Path, public_key_pem: str, root_public_key_pem: str = "", key_list_b64: str = ""
) -> KeyTrust:
    if not root_public_key_pem:
        return KeyTrust.single(load_public_key(public_key_pem.encode()))
    root = load_public_key(root_public_key_pem.encode())
    try:
        bundled = base64.b64decode(key_list_b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidArgument(f"agent config key_list is not base64: {e}") from None
    trust = KeyTrust.from_root(root, bundled)
    saved = state_dir / KEYS_FILE
    if saved.exists():
        try:
            data = saved.read_bytes()
            if verify_key_list(data, root).version > trust.keys.version:
                trust.update(data)
        except (FleetError, OSError) as e:  # damaged: the bundle's list, newer ones follow
            logger.warning("saved key list %s unusable (%s); using the enrolment one", saved, e)
    return trust


def save_key_list(state_dir: Path, data: bytes) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / KEYS_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
