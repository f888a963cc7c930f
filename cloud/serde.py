"""Coordinator-side protobuf encoders: what the coordinator sends devices.

What devices send is decoded in `cloud.inbound` (one module per direction)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.protos.delta import DeltaOffer
from edgefleet.protos.fleet.v1 import device_pb2, model_pb2
from edgefleet.protos.manifest import SignedManifest, key_id

#: how long a signed desired state may start an update: long enough for a device that
#: is off for a holiday, short enough that a captured one cannot be replayed forever
DESIRED_TTL_S = 30 * 24 * 3600.0

ACTIONS = {
    "activate": device_pb2.DesiredState.ACTION_ACTIVATE,
    "rollback": device_pb2.DesiredState.ACTION_ROLLBACK,
    "shadow": device_pb2.DesiredState.ACTION_SHADOW,
}


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
    ttl_s: float = DESIRED_TTL_S,
    delta: DeltaOffer | None = None,
) -> bytes:
    """A signed DesiredState, ready to publish retained on dev/{id}/desired.

    `sample_rate` and `report_interval_ms` go with `action="shadow"` (ShadowPolicy).
    The device refuses it as a new generation `ttl_s` seconds from now (0: never).
    """
    now_ms = int(time.time() * 1000)
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
        issued_at_ms=now_ms,
        not_after_ms=now_ms + int(ttl_s * 1000) if ttl_s else 0,
    )
    if delta is not None:
        desired.delta.CopyFrom(
            device_pb2.ArtifactDelta(
                base_sha256=delta.base_sha256,
                sha256=delta.sha256,
                size=delta.size,
                format=delta.format,
                chunk_size=delta.chunk_size,
                chunk_sha256=list(delta.chunk_digests),
            )
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


def refresh_desired(
    signed: bytes,
    key: Ed25519PrivateKey,
    *,
    ttl_s: float = DESIRED_TTL_S,
    now_ms: int | None = None,
) -> bytes:
    """A stored signed desired state, ready to publish again: the same state (generation,
    manifest, chunks, action) with a fresh expiry and signed by `key`, when it would expire
    within half of `ttl_s` or was signed by another key (rotated since); else unchanged.
    A device away for longer than the expiry then still gets a state it accepts."""
    env = device_pb2.SignedDesiredState()
    env.ParseFromString(signed)
    desired = device_pb2.DesiredState()
    desired.ParseFromString(env.desired)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    current = key_id(key.public_key())
    fresh = not desired.not_after_ms or desired.not_after_ms - now > ttl_s * 500
    if fresh and env.key_id == current:
        return signed
    desired.issued_at_ms = now
    desired.not_after_ms = now + int(ttl_s * 1000) if ttl_s else 0
    body = desired.SerializeToString(deterministic=True)
    out = device_pb2.SignedDesiredState(desired=body, signature=key.sign(body), key_id=current)
    return bytes(out.SerializeToString(deterministic=True))


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
