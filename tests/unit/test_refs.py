"""Model references as operators type them."""

from __future__ import annotations

import pytest

from edgefleet.cloud.registry import ModelRef
from edgefleet.protos.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("digits", ModelRef("digits")),
        ("digits:latest", ModelRef("digits")),
        ("digits:12", ModelRef("digits", 12)),
        ("digits@production", ModelRef("digits", stage="production")),
    ],
)
def test_parse(text: str, want: ModelRef) -> None:
    assert ModelRef.parse(text) == want


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("digits:0", "not a positive number"),
        ("digits:v2", "accepted: NAME, NAME:N"),
        ("Digits", "lowercase"),
        ("digits@live", "accepted: none, staging, production, archived"),
    ],
)
def test_bad_refs(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        ModelRef.parse(text)
