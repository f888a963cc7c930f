"""The one table of which role each gRPC method needs, and which calls are audited.

viewer: read-only calls. operator: what changes models and rollouts (train, quantize,
promote, deploy, rollout control, federated runs). admin: identities and keys (tokens,
device enrolment and removal, signing keys). A method missing here needs admin
(`rule_for`), and tests/unit/test_access.py fails until it is added.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.cloud.access.model import ADMIN, OPERATOR, VIEWER


@dataclass(frozen=True)
class Rule:
    role: str
    audited: bool = False  # state-changing: every call recorded, refused ones too


_FLEET = "/fleet.v1.FleetService/"
_FL = "/fleet.v1.FederatedService/"
_ACCESS = "/fleet.v1.AccessService/"

METHODS: dict[str, Rule] = {
    # models
    _FLEET + "ListModels": Rule(VIEWER),
    _FLEET + "ListVersions": Rule(VIEWER),
    _FLEET + "GetVersion": Rule(VIEWER),
    _FLEET + "Verify": Rule(VIEWER),
    _FLEET + "Train": Rule(OPERATOR, audited=True),
    _FLEET + "Quantize": Rule(OPERATOR, audited=True),
    _FLEET + "Promote": Rule(OPERATOR, audited=True),
    # devices
    _FLEET + "ListDevices": Rule(VIEWER),
    _FLEET + "GetDevice": Rule(VIEWER),
    _FLEET + "Status": Rule(VIEWER),
    _FLEET + "EnrollDevice": Rule(ADMIN, audited=True),
    _FLEET + "EnrollDevices": Rule(ADMIN, audited=True),
    _FLEET + "ReissueDevices": Rule(ADMIN, audited=True),
    # rollouts (Deploy covers staged rollouts and dry runs too)
    _FLEET + "Deploy": Rule(OPERATOR, audited=True),
    _FLEET + "ListRollouts": Rule(VIEWER),
    _FLEET + "GetRollout": Rule(VIEWER),
    _FLEET + "WatchRollout": Rule(VIEWER),
    _FLEET + "ControlRollout": Rule(OPERATOR, audited=True),
    # drift
    _FLEET + "GetDrift": Rule(VIEWER),
    _FLEET + "ListAlerts": Rule(VIEWER),
    # federated learning
    _FL + "StartRun": Rule(OPERATOR, audited=True),
    _FL + "WatchRun": Rule(VIEWER),
    _FL + "GetRun": Rule(VIEWER),
    _FL + "ListRuns": Rule(VIEWER),
    _FL + "EnrollNode": Rule(ADMIN, audited=True),
    # operators and audit
    _ACCESS + "CreateToken": Rule(ADMIN, audited=True),
    _ACCESS + "ListTokens": Rule(ADMIN),
    _ACCESS + "RevokeToken": Rule(ADMIN, audited=True),
    _ACCESS + "ListAudit": Rule(OPERATOR),
}

UNKNOWN = Rule(ADMIN, audited=True)


def rule_for(method: str) -> Rule:
    """The rule for a full gRPC method name (/package.Service/Method); admin if unknown."""
    return METHODS.get(method, UNKNOWN)


def short_name(method: str) -> str:
    """'Deploy' for '/fleet.v1.FleetService/Deploy' (what the audit log calls the action)."""
    return method.rsplit("/", 1)[-1]
