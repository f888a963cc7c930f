"""Coordinator-side protobuf conversions: the only cloud module importing device_pb2."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message

from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.fleet.v1 import device_pb2, model_pb2
from edgefleet.protos.manifest import SignedManifest, key_id

ACTIONS = {
    "activate": device_pb2.DesiredState.ACTION_ACTIVATE,
    "rollback": device_pb2.DesiredState.ACTION_ROLLBACK,
    "shadow": device_pb2.DesiredState.ACTION_SHADOW,
}


def _parse(cls: type[Message], data: bytes, what: str) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise InvalidArgument(
            f"{what} ({len(data)} bytes) is not a valid {cls.__name__}: {e}"
        ) from None
    return msg


def _to_dict(msg: Message) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, use_integers_for_enums=False)


def decode_status(data: bytes) -> dict[str, Any]:
    d = _to_dict(_parse(device_pb2.DeviceStatus, data, "status"))
    d.setdefault("online", False)
    return d


def decode_reported(data: bytes) -> dict[str, Any]:
    d = _to_dict(_parse(device_pb2.ReportedState, data, "reported state"))
    d["state"] = (
        str(d.get("state", "UPDATE_STATE_UNSPECIFIED")).removeprefix("UPDATE_STATE_").lower()
    )
    d["reason"] = (
        str(d.get("reason", "REASON_CODE_UNSPECIFIED")).removeprefix("REASON_CODE_").lower()
    )
    d["generation"] = int(d.get("generation", 0))
    return d


def decode_want(data: bytes) -> tuple[str, str, list[tuple[int, int]], bool]:
    """(device id, artifact sha256, missing chunk ranges, resume)."""
    w = _parse(device_pb2.ArtifactWant, data, "artifact want")
    return w.device_id, w.sha256, [(r.start, r.end) for r in w.missing], w.resume


def encode_chunk(sha256: str, index: int, total: int, data: bytes) -> bytes:
    return bytes(
        device_pb2.ArtifactChunk(
            sha256=sha256, index=index, total=total, data=data
        ).SerializeToString()
    )


def encode_desired(
    *,
    device_id: str,
    generation: int,
    rollout_id: str,
    manifest: SignedManifest,
    chunk_size: int,
    chunk_digests: Sequence[bytes],
    action: str,
    key: Ed25519PrivateKey,
    sample_rate: float = 1.0,
    report_interval_ms: int = 1000,
) -> bytes:
    """A signed DesiredState, ready to publish retained on dev/{id}/desired.

    `sample_rate` and `report_interval_ms` go with `action="shadow"` (ShadowPolicy).
    """
    desired = device_pb2.DesiredState(
        device_id=device_id,
        generation=generation,
        rollout_id=rollout_id,
        manifest=model_pb2.SignedManifest(
            manifest=manifest.manifest_bytes, signature=manifest.signature, key_id=manifest.key_id
        ),
        chunk_size=chunk_size,
        chunk_sha256=list(chunk_digests),
        action=ACTIONS[action],
        issued_at_ms=int(time.time() * 1000),
    )
    if action == "shadow":
        desired.shadow.CopyFrom(
            device_pb2.ShadowPolicy(sample_rate=sample_rate, report_interval_ms=report_interval_ms)
        )
    body = desired.SerializeToString(deterministic=True)
    signed = device_pb2.SignedDesiredState(
        desired=body, signature=key.sign(body), key_id=key_id(key.public_key())
    )
    return bytes(signed.SerializeToString(deterministic=True))


@dataclass(frozen=True)
class ShadowReport:
    """A decoded `ShadowReport`: which device, generation and rollout, and its summary."""

    device_id: str
    generation: int
    rollout_id: str
    summary: dict[str, float]


def decode_shadow_report(data: bytes) -> ShadowReport:
    """The report, with its numbers flattened for gates and storage (latency in µs, memory
    in MB)."""
    m = _parse(device_pb2.ShadowReport, data, "shadow report")
    mb = 1024 * 1024
    summary = {
        "samples": float(m.samples),
        "agreed": float(m.agreed),
        "labelled": float(m.labelled),
        "errors": float(m.errors),
        "dropped": float(m.dropped),
        "active_p50_us": m.active.latency_p50_us,
        "candidate_p50_us": m.candidate.latency_p50_us,
        "active_p95_us": m.active.latency_p95_us,
        "candidate_p95_us": m.candidate.latency_p95_us,
        "active_memory_mb": m.active.memory_bytes / mb,
        "candidate_memory_mb": m.candidate.memory_bytes / mb,
        "active_correct": float(m.active.correct),
        "candidate_correct": float(m.candidate.correct),
        "rss_mb": m.rss_bytes / mb,
    }
    return ShadowReport(m.device_id, int(m.generation), m.rollout_id, summary)


def seq_ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted, disjoint, inclusive ranges covering `seqs` ([1, 2, 3, 7] -> [(1, 3), (7, 7)])."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def encode_telemetry_ack(device_id: str, seqs: Sequence[int]) -> bytes:
    """The `TelemetryAck` telling `device_id` that these windows are committed."""
    msg = device_pb2.TelemetryAck(device_id=device_id)
    for first, last in seq_ranges(seqs):
        msg.committed.add(first=first, last=last)
    return bytes(msg.SerializeToString())
