"""Broker ACLs generated from one table of topic rules, built with `Topics(prefix)`.

Devices get Mosquitto `pattern` lines: `%u` is the username, which is the device id (the
client certificate's CN with `use_identity_as_username`, or the password-file user).
The coordinator gets its own user block with the whole prefix and the shared
subscriptions cloud/telemetry uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edgefleet.protos.topics import Topics

#: the coordinator's MQTT username: '@' cannot appear in a device id, so no device can
#: be enrolled under it
COORDINATOR_USER = "coordinator@edgefleet"
_U = "%u"  # Mosquitto's username substitution in `pattern` lines
_ANY = "+"


@dataclass(frozen=True)
class Rule:
    access: str  # "read" (subscribe/receive) | "write" (publish)
    topic: str  # with %u for the device's own id


def device_rules(topics: Topics) -> tuple[Rule, ...]:
    """What one device may do. Everything else is refused."""
    p = topics.prefix
    own = f"{p}/dev/{_U}"
    return (
        Rule("write", f"{own}/status"),
        Rule("write", f"{own}/reported"),
        Rule("write", f"{own}/telemetry"),
        Rule("write", f"{own}/shadow"),
        Rule("write", f"{p}/art/{_ANY}/want"),
        Rule("read", f"{own}/desired"),
        Rule("read", f"{own}/ack"),
        Rule("read", f"{p}/art/{_ANY}/chunk"),
        Rule("read", f"{p}/keys"),
    )


def _all(topics: Topics | Sequence[Topics]) -> list[Topics]:
    return [topics] if isinstance(topics, Topics) else list(dict.fromkeys(topics))


def device_acl(topics: Topics | Sequence[Topics], *, revoked: Iterable[str] = ()) -> str:
    """A Mosquitto acl_file for the device listeners: the pattern lines, and a `deny`
    block per revoked device (a revoked device whose TLS session is still open can then
    neither publish nor receive; the CRL refuses its next connection)."""
    lines = [
        "# written by edgefleet from the topic tree; regenerated, do not edit",
        "# devices: username = client id = device id",
    ]
    for user in sorted(set(revoked)):
        lines += [f"user {user}", "topic deny #"]
    for t in _all(topics):
        lines += [f"pattern {r.access} {r.topic}" for r in device_rules(t)]
    return "\n".join(lines) + "\n"


def coordinator_acl(topics: Topics | Sequence[Topics], user: str = COORDINATOR_USER) -> str:
    """A Mosquitto acl_file for the coordinator's listener."""
    lines = ["# written by edgefleet; the coordinator's rights", f"user {user}"]
    for t in _all(topics):
        lines += [f"topic readwrite {t.prefix}/#", f"topic read $share/+/{t.prefix}/#"]
    return "\n".join(lines) + "\n"
