"""Coordinator-side protobuf conversions: the only cloud module importing device_pb2."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message

from protos.errors import InvalidArgument
from protos.fleet.v1 import device_pb2, model_pb2
from protos.manifest import SignedManifest, key_id

ACTIONS = {
    "activate": device_pb2.DesiredState.ACTION_ACTIVATE,
    "rollback": device_pb2.DesiredState.ACTION_ROLLBACK,
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


def decode_want(data: bytes) -> tuple[str, str, int, list[tuple[int, int]]]:
    w = _parse(device_pb2.ArtifactWant, data, "artifact want")
    return w.device_id, w.sha256, w.chunks_total, [(r.start, r.end) for r in w.missing]


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
) -> bytes:
    """A signed DesiredState, ready to publish retained on dev/{id}/desired."""
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
    body = desired.SerializeToString(deterministic=True)
    signed = device_pb2.SignedDesiredState(
        desired=body, signature=key.sign(body), key_id=key_id(key.public_key())
    )
    return bytes(signed.SerializeToString(deterministic=True))
