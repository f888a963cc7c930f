"""Roles: one table covers every RPC the coordinator serves; token and argument hygiene."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from edgefleet.cloud.access.model import ROLES, check_role, redact, role_allows
from edgefleet.cloud.access.roles import METHODS, UNKNOWN, rule_for, short_name
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.fleet.v1 import access_pb2, federated_pb2, fleet_pb2


def _served_methods() -> set[str]:
    out = set()
    for module in (fleet_pb2, federated_pb2, access_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return out


def test_every_served_method_has_a_rule_and_no_rule_is_stale() -> None:
    served = _served_methods()
    assert served - set(METHODS) == set(), "add these to cloud/access/roles.py METHODS"
    assert set(METHODS) - served == set(), "these rules name no method"


def test_state_changing_methods_are_audited_and_need_more_than_viewer() -> None:
    changing = {
        "Train",
        "Quantize",
        "Promote",
        "EnrollDevice",
        "EnrollDevices",
        "ReissueDevices",
        "Deploy",
        "ControlRollout",
        "StartRun",
        "EnrollNode",
        "CreateToken",
        "RevokeToken",
    }
    for method, rule in METHODS.items():
        if short_name(method) in changing:
            assert rule.audited and rule.role != "viewer", method
        else:
            assert not rule.audited, method
    assert rule_for("/fleet.v1.FleetService/Deploy").role == "operator"
    assert rule_for("/fleet.v1.AccessService/CreateToken").role == "admin"
    assert rule_for("/fleet.v1.FleetService/ListModels").role == "viewer"
    assert rule_for("/fleet.v1.FleetService/SomethingNew") == UNKNOWN
    assert UNKNOWN.role == "admin" and UNKNOWN.audited


def test_roles_are_ordered() -> None:
    assert ROLES == ("viewer", "operator", "admin")
    assert role_allows("admin", "operator") and role_allows("operator", "operator")
    assert not role_allows("viewer", "operator") and not role_allows("operator", "admin")
    assert check_role(" Operator ") == "operator"
    with pytest.raises(InvalidArgument, match="accepted: viewer, operator, admin"):
        check_role("root")


def test_redact_leaves_secrets_out_at_any_depth() -> None:
    assert redact({"a": 1, "Password": "x", "l": [{"token": "t", "b": 2}]}) == {
        "a": 1,
        "Password": "(secret)",
        "l": [{"token": "(secret)", "b": 2}],
    }


def test_since_takes_durations_and_times() -> None:
    from edgefleet.cloud.cli.audit import parse_since

    now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    assert parse_since("2h", now=now) == datetime(2026, 11, 29, 10, 0, tzinfo=timezone.utc)
    assert parse_since("2026-11-29T06:00:00", now=now).hour == 6
    with pytest.raises(InvalidArgument, match="--since 'yesterday' is neither"):
        parse_since("yesterday", now=now)


def test_local_call_args_are_named_jsonable_and_without_callbacks() -> None:
    from edgefleet.cloud.access.client import call_args

    def promote(ref: object, stage: str, *, archive_existing: bool, on_x: object = None) -> None:
        pass

    args = call_args(promote, ("digits:1", "production"), {"archive_existing": True, "on_x": print})
    assert args == {"ref": "digits:1", "stage": "production", "archive_existing": True}
