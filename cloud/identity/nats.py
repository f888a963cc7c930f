"""NATS users and permissions for NATS's MQTT listener, from the same topic rules as the
Mosquitto ACLs (`acl.device_rules`).

NATS maps an MQTT topic to a subject by turning `/` into `.` (`ef/v1/dev/d1/status` is
`ef.v1.dev.d1.status`), `+` into `*` and a trailing `#` into `>`; its permissions are
on subjects. NATS config users have no `%u` pattern, so every device gets its own user
block with its id written in. Passwords are bcrypt hashes (NATS takes `$2a$`/`$2b$`):
the identity store keeps one per device next to the Mosquitto `$7$` hash (devices
enrolled before have none and are left out, with a warning: enrol them again).

Every MQTT user also needs `$MQTT.sub.>` to subscribe: NATS delivers QoS 1 messages
through a JetStream consumer on such a subject in the user's name. NATS refuses MQTT
topic filters that start with `$MQTT` (checked in tests/e2e/test_nats_cluster.py) and
the users are limited to MQTT connections, so no device can read another's deliveries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from edgefleet.cloud.identity.acl import COORDINATOR_USER, device_rules
from edgefleet.cloud.identity.passwords import bcrypt_hash
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.topics import Topics

if TYPE_CHECKING:
    from edgefleet.cloud.identity.store import IdentityStore

logger = logging.getLogger(__name__)

#: the subjects NATS delivers QoS 1 subscriptions on (JetStream consumers)
MQTT_DELIVERY = "$MQTT.sub.>"


def subject(topic: str) -> str:
    """The NATS subject of an MQTT topic or filter: `a/+/c/#` -> `a.*.c.>`."""
    levels = topic.split("/")
    bad = [lv for lv in levels if not lv or "." in lv or " " in lv]
    if bad:
        raise InvalidArgument(
            f"MQTT topic {topic!r} has no NATS subject: level {bad[0]!r} is empty or holds "
            "'.' or ' ' (NATS 2.9 cannot carry those; use ids of letters, digits, '_', '-')"
        )
    return ".".join("*" if lv == "+" else ">" if lv == "#" else lv for lv in levels)


def _all(topics: Topics | Sequence[Topics]) -> list[Topics]:
    return [topics] if isinstance(topics, Topics) else list(dict.fromkeys(topics))


def device_permissions(
    device_id: str, topics: Topics | Sequence[Topics]
) -> dict[str, dict[str, list[str]]]:
    """{publish: {allow}, subscribe: {allow}} for one device, from `device_rules`."""
    publish: list[str] = []
    receive: list[str] = []
    for t in _all(topics):
        for rule in device_rules(t):
            s = subject(rule.topic.replace("%u", device_id))
            (publish if rule.access == "write" else receive).append(s)
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": [*receive, MQTT_DELIVERY]},
    }


def coordinator_permissions(topics: Topics | Sequence[Topics]) -> dict[str, dict[str, list[str]]]:
    whole = [subject(f"{t.prefix}/#") for t in _all(topics)]
    return {"publish": {"allow": whole}, "subscribe": {"allow": [*whole, MQTT_DELIVERY]}}


def nats_authorization(
    devices: Mapping[str, str],
    coordinator: tuple[str, str],
    *,
    topics: Topics | Sequence[Topics],
    extra: Mapping[str, tuple[str, Sequence[Topics]]] | None = None,
) -> str:
    """A NATS config file holding one `authorization` block: `devices` {device id: bcrypt
    hash}, the coordinator (user, bcrypt hash or password) with the whole prefix, and
    `extra` coordinator-like users. Include it from each node's config
    (`include "auth.conf"`); NATS config accepts JSON values, so it is written as such."""
    users: list[dict[str, object]] = []
    user, secret = coordinator
    users.append(_user(user, secret, coordinator_permissions(topics)))
    for name, (pw, their_topics) in (extra or {}).items():
        users.append(_user(name, pw, coordinator_permissions(their_topics)))
    skipped = 0
    for device_id, hashed in sorted(devices.items()):
        try:
            users.append(_user(device_id, hashed, device_permissions(device_id, topics)))
        except InvalidArgument as e:
            skipped += 1
            logger.warning("device %s left out of the NATS users: %s", device_id, e)
    if skipped:
        logger.warning("%d devices cannot use a NATS broker (see above)", skipped)
    lines = [
        "# written by edgefleet from the topic tree and the enrolled devices; do not edit",
        "authorization {",
        "  users = [",
        *(f"    {json.dumps(u)}" for u in users),
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _user(name: str, secret: str, permissions: object) -> dict[str, object]:
    if not name or any(c in name for c in "\n\"'"):
        raise InvalidArgument(f"NATS user name {name!r} cannot go in a config file")
    return {
        "user": name,
        "password": secret,
        "permissions": permissions,
        "allowed_connection_types": ["MQTT"],
    }


def nats_config(identities: IdentityStore, *, topics: Topics | Sequence[Topics]) -> str:
    """`nats_authorization` for the live devices of an identity store and its coordinator."""
    hashes = identities.bcrypt_hashes(kind="device")
    missing = sorted(set(identities.password_hashes(kind="device")) - set(hashes))
    if missing:
        logger.warning(
            "%d devices were enrolled before NATS support and have no bcrypt hash "
            "(e.g. %s): enrol them again to use a NATS broker",
            len(missing),
            missing[0],
        )
    own = identities.coordinator()
    return nats_authorization(hashes, (COORDINATOR_USER, bcrypt_hash(own.password)), topics=topics)


__all__ = [
    "MQTT_DELIVERY",
    "coordinator_permissions",
    "device_permissions",
    "nats_authorization",
    "nats_config",
    "subject",
]
