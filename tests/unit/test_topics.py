from __future__ import annotations

import pytest

from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.topics import Topics

SHA = "ab" * 32


def test_build_and_parse_roundtrip() -> None:
    t = Topics("ef/v1")
    assert t.status("cam-01") == "ef/v1/dev/cam-01/status"
    assert t.parse(t.reported("cam-01")) == ("dev", "cam-01", "reported")
    assert t.parse(t.chunk(SHA)) == ("art", SHA, "chunk")
    assert t.all_devices("telemetry") == "ef/v1/dev/+/telemetry"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: t.status("bad/id"), "device id 'bad/id'"),
        (lambda t: t.chunk("xyz"), "not a sha256"),
        (lambda t: t.device("d", "logs"), "accepted: status, desired"),
        (lambda t: t.parse("other/dev/d/status"), "not under 'ef/v1'"),
        (lambda t: t.parse("ef/v1/dev/d/logs"), "kind 'logs'"),
        (lambda t: t.parse("ef/v1/dev/d"), "expected ef/v1/dev/ID/KIND"),
    ],
)
def test_bad_topics_are_named(call: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        call(Topics())  # type: ignore[operator]
