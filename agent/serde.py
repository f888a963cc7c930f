"""The agent's only bridge to protobuf: messages in, plain Python values out.

Every other agent module works with numpy arrays, `protos.manifest` values and the
frozen dataclasses defined here; `*_pb2` types stop at this module. The message
type aliases at the end (`PredictRequest`, …) exist so that `agent.server` can
annotate what gRPC hands it without importing generated code; it passes those
messages straight back here and never reads their fields.

Tensors are dense, row-major, little-endian (inference.proto `Tensor`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import numpy as np

from edgefleet.protos.delta import DeltaOffer
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.fleet.v1 import device_pb2, inference_pb2, model_pb2
from edgefleet.protos.manifest import DTYPES, Manifest, TensorSpec

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from edgefleet.agent.capabilities import Capabilities
    from edgefleet.agent.drift import DriftWindow
    from edgefleet.agent.inference import LatencyHistogram

PredictRequest: TypeAlias = inference_pb2.PredictRequest
PredictResponse: TypeAlias = inference_pb2.PredictResponse
ModelMetadataRequest: TypeAlias = inference_pb2.ModelMetadataRequest
ModelMetadata: TypeAlias = inference_pb2.ModelMetadata
HealthRequest: TypeAlias = inference_pb2.HealthRequest
HealthResponse: TypeAlias = inference_pb2.HealthResponse

# DType code -> little-endian numpy dtype, and numpy dtype name -> code.
_NP_BY_CODE: dict[int, np.dtype[np.generic]] = {
    code: np.dtype(name).newbyteorder("<") for name, code in DTYPES.items()
}
_SUPPORTED = ", ".join(DTYPES)


# -- values -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """Which model answered or is serving: `fleet.v1.ModelRef` as a value."""

    model: str
    version: int
    variant: str
    sha256: str

    @classmethod
    def from_manifest(cls, m: Manifest) -> ModelRef:
        return cls(model=m.model, version=m.version, variant=m.variant, sha256=m.sha256)

    def __str__(self) -> str:
        return f"{self.model}:{self.version}/{self.variant}"


class UpdateState(enum.IntEnum):
    """`fleet.v1.UpdateState`, for modules that must not import `device_pb2`."""

    UNSPECIFIED = device_pb2.UPDATE_STATE_UNSPECIFIED
    IDLE = device_pb2.UPDATE_STATE_IDLE
    DOWNLOADING = device_pb2.UPDATE_STATE_DOWNLOADING
    VERIFYING = device_pb2.UPDATE_STATE_VERIFYING
    LOADING = device_pb2.UPDATE_STATE_LOADING
    SELF_TEST = device_pb2.UPDATE_STATE_SELF_TEST
    ACTIVE = device_pb2.UPDATE_STATE_ACTIVE
    FAILED = device_pb2.UPDATE_STATE_FAILED
    ROLLED_BACK = device_pb2.UPDATE_STATE_ROLLED_BACK
    SHADOWING = device_pb2.UPDATE_STATE_SHADOWING


@dataclass(frozen=True)
class AgentStatus:
    """What `Health` reports besides the serving model; supplied by the supervisor.

    Here rather than in `agent.server` so that the supervisor names it without
    importing grpc, which an agent with no `listen` address never loads."""

    connected: bool = False
    update_state: UpdateState = UpdateState.UNSPECIFIED


@dataclass(frozen=True)
class PredictCall:
    """A decoded `PredictRequest`."""

    x: np.ndarray
    request_id: str
    labels: tuple[int, ...]  # optional ground truth, one class index per row


@dataclass(frozen=True)
class PredictResult:
    """A decoded `PredictResponse` (client side)."""

    output: np.ndarray
    model: ModelRef | None
    latency_us: int
    request_id: str


@dataclass(frozen=True)
class ModelInfo:
    """A decoded `ModelMetadata` (client side)."""

    model: ModelRef | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    runtime: str
    provider: str
    labels: Mapping[str, str]


# -- tensors ------------------------------------------------------------------------


def tensor_to_array(t: inference_pb2.Tensor) -> np.ndarray:
    """Decode a `Tensor`; `InvalidArgument` names the dtype, shape and byte count.

    The array shares the message's bytes (read-only, no copy) on little-endian hosts.
    """
    dtype = _NP_BY_CODE.get(t.dtype)
    if dtype is None:
        raise InvalidArgument(
            f"tensor dtype {_dtype_label(t.dtype)} is not supported; supported: {_SUPPORTED}"
        )
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {shape} has a negative dimension")
    # math.prod on Python ints: no overflow for hostile shapes like (2**62, 2**62).
    want = math.prod(shape) * dtype.itemsize
    if len(t.data) != want:
        raise InvalidArgument(
            f"tensor data is {len(t.data)} bytes; shape {shape} of {dtype.name} needs {want} bytes"
        )
    x = np.frombuffer(t.data, dtype=dtype).reshape(shape)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def array_to_tensor(x: np.ndarray) -> inference_pb2.Tensor:
    code = DTYPES.get(x.dtype.name)
    if code is None:
        raise InvalidArgument(f"array dtype {x.dtype.name} cannot be sent; supported: {_SUPPORTED}")
    data = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
    return inference_pb2.Tensor(dtype=code, shape=list(x.shape), data=data)  # type: ignore[arg-type]


# -- model refs and specs -----------------------------------------------------------


def ref_to_proto(ref: ModelRef | None) -> device_pb2.ModelRef:
    """`None` (nothing serving) becomes the empty message."""
    if ref is None:
        return device_pb2.ModelRef()
    return device_pb2.ModelRef(
        model=ref.model, version=ref.version, variant=ref.variant, sha256=ref.sha256
    )


def ref_from_proto(msg: device_pb2.ModelRef) -> ModelRef | None:
    """The empty message (nothing serving) becomes `None`."""
    if not msg.model:
        return None
    return ModelRef(model=msg.model, version=msg.version, variant=msg.variant, sha256=msg.sha256)


def _dtype_label(code: int) -> str:
    return model_pb2.DType.Name(code) if code in model_pb2.DType.values() else f"code {code}"  # type: ignore[arg-type]


def spec_to_proto(spec: TensorSpec) -> model_pb2.TensorSpec:
    return model_pb2.TensorSpec(
        name=spec.name,
        dtype=DTYPES[spec.dtype],  # type: ignore[arg-type]
        shape=list(spec.shape),
    )


def spec_from_proto(msg: model_pb2.TensorSpec) -> TensorSpec:
    for name, code in DTYPES.items():
        if code == msg.dtype:
            return TensorSpec(msg.name, name, tuple(msg.shape))
    raise InvalidArgument(
        f"tensor {msg.name!r}: dtype {_dtype_label(msg.dtype)} is not supported; "
        f"supported: {_SUPPORTED}"
    )


# -- InferenceService messages (server side) ----------------------------------------


def decode_predict_request(req: inference_pb2.PredictRequest) -> PredictCall:
    if not req.HasField("input"):
        raise InvalidArgument(f"request {req.request_id!r} carries no input tensor")
    x = tensor_to_array(req.input)
    rows = int(x.shape[0]) if x.ndim else 1
    if req.labels and len(req.labels) != rows:
        raise InvalidArgument(
            f"request {req.request_id!r} carries {len(req.labels)} labels for {rows} input rows; "
            "send one class index per row, or none"
        )
    return PredictCall(x=x, request_id=req.request_id, labels=tuple(req.labels))


def encode_predict_response(
    output: np.ndarray, model: ModelRef, *, latency_us: int, request_id: str
) -> inference_pb2.PredictResponse:
    return inference_pb2.PredictResponse(
        output=array_to_tensor(output),
        model=ref_to_proto(model),
        latency_us=max(0, latency_us),
        request_id=request_id,
    )


def encode_model_metadata(manifest: Manifest, *, provider: str) -> inference_pb2.ModelMetadata:
    return inference_pb2.ModelMetadata(
        model=ref_to_proto(ModelRef.from_manifest(manifest)),
        inputs=[spec_to_proto(s) for s in manifest.inputs],
        outputs=[spec_to_proto(s) for s in manifest.outputs],
        runtime=manifest.runtime,
        provider=provider,
        labels=dict(manifest.labels),
    )


def encode_health(
    *, serving: bool, connected: bool, active: ModelRef | None, update_state: UpdateState
) -> inference_pb2.HealthResponse:
    return inference_pb2.HealthResponse(
        serving=serving,
        connected=connected,
        active=ref_to_proto(active),
        update_state=int(update_state),  # type: ignore[arg-type]
    )


def histogram_to_proto(h: LatencyHistogram) -> device_pb2.Histogram:
    return device_pb2.Histogram(
        bounds_us=list(h.bounds_us), counts=list(h.counts), sum_us=h.sum_us, count=h.count
    )


# -- InferenceService messages (client side: on-device apps, simulator, tests) -------


def encode_predict_request(
    x: np.ndarray, *, request_id: str = "", labels: Sequence[int] = ()
) -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(
        input=array_to_tensor(x), request_id=request_id, labels=list(labels)
    )


def decode_predict_response(resp: inference_pb2.PredictResponse) -> PredictResult:
    return PredictResult(
        output=tensor_to_array(resp.output),
        model=ref_from_proto(resp.model),
        latency_us=resp.latency_us,
        request_id=resp.request_id,
    )


def decode_model_metadata(msg: inference_pb2.ModelMetadata) -> ModelInfo:
    return ModelInfo(
        model=ref_from_proto(msg.model),
        inputs=tuple(spec_from_proto(t) for t in msg.inputs),
        outputs=tuple(spec_from_proto(t) for t in msg.outputs),
        runtime=msg.runtime,
        provider=msg.provider,
        labels=dict(msg.labels),
    )


# -- MQTT messages (device side) ------------------------------------------------------


class Reason(enum.IntEnum):
    """`fleet.v1.ReasonCode`."""

    UNSPECIFIED = device_pb2.REASON_CODE_UNSPECIFIED
    OK = device_pb2.REASON_CODE_OK
    BAD_SIGNATURE = device_pb2.REASON_CODE_BAD_SIGNATURE
    CHUNK_DIGEST_MISMATCH = device_pb2.REASON_CODE_CHUNK_DIGEST_MISMATCH
    ARTIFACT_DIGEST_MISMATCH = device_pb2.REASON_CODE_ARTIFACT_DIGEST_MISMATCH
    TRUNCATED = device_pb2.REASON_CODE_TRUNCATED
    MALFORMED_MESSAGE = device_pb2.REASON_CODE_MALFORMED_MESSAGE
    UNKNOWN_VARIANT = device_pb2.REASON_CODE_UNKNOWN_VARIANT
    UNSUPPORTED_RUNTIME = device_pb2.REASON_CODE_UNSUPPORTED_RUNTIME
    LOAD_FAILED = device_pb2.REASON_CODE_LOAD_FAILED
    SELF_TEST_FAILED = device_pb2.REASON_CODE_SELF_TEST_FAILED
    DISK_FULL = device_pb2.REASON_CODE_DISK_FULL
    STALE_GENERATION = device_pb2.REASON_CODE_STALE_GENERATION
    NO_LAST_KNOWN_GOOD = device_pb2.REASON_CODE_NO_LAST_KNOWN_GOOD
    EXPIRED = device_pb2.REASON_CODE_EXPIRED
    KEY_REVOKED = device_pb2.REASON_CODE_KEY_REVOKED
    UNTRUSTED_KEY = device_pb2.REASON_CODE_UNTRUSTED_KEY
    OFFLINE_INSTALL = device_pb2.REASON_CODE_OFFLINE_INSTALL
    DELTA_NO_BASE = device_pb2.REASON_CODE_DELTA_NO_BASE
    DELTA_FAILED = device_pb2.REASON_CODE_DELTA_FAILED
    AGENT_INSTALL_FAILED = device_pb2.REASON_CODE_AGENT_INSTALL_FAILED
    AGENT_CHECK_FAILED = device_pb2.REASON_CODE_AGENT_CHECK_FAILED
    AGENT_UNHEALTHY = device_pb2.REASON_CODE_AGENT_UNHEALTHY
    AGENT_PLATFORM = device_pb2.REASON_CODE_AGENT_PLATFORM


@dataclass(frozen=True)
class Desired:
    """A verified `DesiredState`."""

    device_id: str
    generation: int
    rollout_id: str
    signed_manifest: bytes  # serialized SignedManifest, as installed in the slots
    manifest_bytes: bytes
    manifest_signature: bytes
    manifest_key_id: str
    chunk_size: int
    chunk_digests: tuple[bytes, ...]
    action: str  # activate | rollback | shadow
    shadow: ShadowSettings = field(default_factory=lambda: ShadowSettings())
    not_after_ms: int = 0  # refused as a new generation after this; 0: no expiry
    delta: DeltaOffer | None = None  # the artifact as a delta (docs/protocol.md, "Deltas")


@dataclass(frozen=True)
class ShadowSettings:
    """`fleet.v1.ShadowPolicy`: how a device samples live inputs for a shadowed candidate."""

    sample_rate: float = 1.0
    max_per_second: int = 0
    report_interval: float = 1.0


@dataclass(frozen=True)
class ShadowStats:
    """`fleet.v1.ShadowModelStats`: one model's side of a shadow evaluation."""

    model: ModelRef
    latency_p50_us: float
    latency_p95_us: float
    latency_mean_us: float
    memory_bytes: int
    correct: int


#: bounds on what arrives over MQTT (a desired state lists one 32-byte digest per chunk)
MAX_DESIRED_BYTES = 48 * 1024 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_CHUNKS = 1 << 24
MAX_ID = 128  # rollout ids, key ids
INT63 = 2**63 - 1
MAX_DETAIL = 2000  # a report's detail; the coordinator refuses more than 4096

_Msg = TypeVar("_Msg", bound="Message")


def _parse(msg: _Msg, data: bytes, what: str) -> _Msg:
    """`msg` filled from `data`; InvalidArgument naming `what` if it does not parse."""
    try:
        msg.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError
        raise InvalidArgument(f"{what} ({len(data)} bytes) is not valid protobuf: {e}") from None
    return msg


def decode_signed_desired(data: bytes) -> tuple[bytes, bytes, str]:
    """(desired bytes, signature, key id) of a `SignedDesiredState`; InvalidArgument if garbled."""
    if len(data) > MAX_DESIRED_BYTES:
        raise InvalidArgument(
            f"desired state is {len(data)} bytes; at most {MAX_DESIRED_BYTES} accepted"
        )
    msg = _parse(device_pb2.SignedDesiredState(), data, "desired state")
    if not msg.desired or not msg.signature:
        raise InvalidArgument("desired state lacks its body or its signature")
    if len(msg.key_id) > MAX_ID:
        raise InvalidArgument(
            f"desired state key id is {len(msg.key_id)} characters; at most {MAX_ID}"
        )
    return msg.desired, msg.signature, msg.key_id


def decode_desired(body: bytes) -> Desired:
    msg = device_pb2.DesiredState()
    try:
        msg.ParseFromString(body)
    except Exception as e:
        raise InvalidArgument(f"desired state body is not valid protobuf: {e}") from None
    actions = {
        device_pb2.DesiredState.ACTION_ACTIVATE: "activate",
        device_pb2.DesiredState.ACTION_ROLLBACK: "rollback",
        device_pb2.DesiredState.ACTION_SHADOW: "shadow",
    }
    if msg.action not in actions:
        raise InvalidArgument(
            f"desired state action {msg.action} unknown; accepted: activate, rollback, shadow"
        )
    shadow = ShadowSettings()
    if msg.HasField("shadow"):
        rate = msg.shadow.sample_rate
        if not 0.0 < rate <= 1.0:
            raise InvalidArgument(f"shadow sample_rate {rate} must be in (0, 1]")
        shadow = ShadowSettings(
            sample_rate=rate,
            max_per_second=int(msg.shadow.max_per_second),
            report_interval=max(0.1, msg.shadow.report_interval_ms / 1000 or 1.0),
        )
    if msg.generation > INT63:
        raise InvalidArgument(f"desired state generation {msg.generation} is past 2^63 - 1")
    if len(msg.rollout_id) > MAX_ID:
        raise InvalidArgument(f"desired state rollout id is {len(msg.rollout_id)} characters")
    if msg.chunk_size > MAX_CHUNK_SIZE:
        raise InvalidArgument(
            f"desired state chunk size {msg.chunk_size} is over {MAX_CHUNK_SIZE} bytes"
        )
    if len(msg.chunk_sha256) > MAX_CHUNKS or any(len(d) != 32 for d in msg.chunk_sha256):
        raise InvalidArgument(
            f"desired state lists {len(msg.chunk_sha256)} chunk digests; each must be 32 bytes, "
            f"at most {MAX_CHUNKS}"
        )
    delta = None
    if msg.HasField("delta"):
        d = msg.delta
        if (
            not (_is_sha256(d.base_sha256) and _is_sha256(d.sha256))
            or d.chunk_size > MAX_CHUNK_SIZE
            or len(d.chunk_sha256) > MAX_CHUNKS
            or any(len(x) != 32 for x in d.chunk_sha256)
        ):
            raise InvalidArgument(
                f"desired state delta (base {d.base_sha256[:16]!r}, {len(d.chunk_sha256)} chunk "
                f"digests of {d.chunk_size} bytes) is malformed; expected sha256 hex digests, "
                f"32-byte chunk digests, at most {MAX_CHUNKS} chunks of {MAX_CHUNK_SIZE} bytes"
            )
        delta = DeltaOffer(
            base_sha256=d.base_sha256,
            sha256=d.sha256,
            size=int(d.size),
            format=int(d.format),
            chunk_size=int(d.chunk_size),
            chunk_digests=tuple(d.chunk_sha256),
        )
    sm = msg.manifest
    return Desired(
        device_id=msg.device_id,
        generation=int(msg.generation),
        rollout_id=msg.rollout_id,
        signed_manifest=sm.SerializeToString(deterministic=True),
        manifest_bytes=sm.manifest,
        manifest_signature=sm.signature,
        manifest_key_id=sm.key_id,
        chunk_size=int(msg.chunk_size),
        chunk_digests=tuple(msg.chunk_sha256),
        action=actions[msg.action],
        shadow=shadow,
        not_after_ms=int(msg.not_after_ms),
        delta=delta,
    )


def _is_sha256(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _ref(r: ModelRef | None) -> device_pb2.ModelRef:
    if r is None:
        return device_pb2.ModelRef()
    return device_pb2.ModelRef(model=r.model, version=r.version, variant=r.variant, sha256=r.sha256)


def encode_status(
    *,
    device_id: str,
    online: bool,
    agent_version: str = "",
    capabilities: Capabilities | None = None,
    active: ModelRef | None = None,
    boot_id: str = "",
    timestamp_ms: int = 0,
) -> bytes:
    msg = device_pb2.DeviceStatus(
        device_id=device_id,
        online=online,
        agent_version=agent_version,
        boot_id=boot_id,
        timestamp_ms=timestamp_ms,
    )
    if capabilities is not None:
        c = capabilities
        msg.capabilities.CopyFrom(
            device_pb2.Capabilities(
                machine=c.machine,
                runtimes=list(c.runtimes),
                providers=list(c.providers),
                accelerator=c.accelerator,
                memory_mb=c.memory_mb,
                tflite_runtime_legacy=c.tflite_runtime_legacy,
                features=list(c.features),
            )
        )
    if active is not None:
        msg.active.CopyFrom(_ref(active))
    return bytes(msg.SerializeToString())


def encode_reported(
    *,
    device_id: str,
    generation: int,
    state: UpdateState,
    reason: Reason,
    detail: str,
    active: ModelRef | None,
    last_known_good: ModelRef | None,
    chunks_have: int = 0,
    chunks_total: int = 0,
    provider: str = "",
    timestamp_ms: int = 0,
) -> bytes:
    msg = device_pb2.ReportedState(
        device_id=device_id,
        generation=generation,
        state=int(state),  # type: ignore[arg-type]
        reason=int(reason),  # type: ignore[arg-type]
        detail=detail[:MAX_DETAIL],
        chunks_have=chunks_have,
        chunks_total=chunks_total,
        provider=provider,
        timestamp_ms=timestamp_ms,
    )
    if active is not None:
        msg.active.CopyFrom(_ref(active))
    if last_known_good is not None:
        msg.last_known_good.CopyFrom(_ref(last_known_good))
    return bytes(msg.SerializeToString())


def encode_want(
    device_id: str,
    sha256: str,
    total: int,
    missing: Sequence[tuple[int, int]],
    *,
    resume: bool = False,
) -> bytes:
    msg = device_pb2.ArtifactWant(
        device_id=device_id, sha256=sha256, chunks_total=total, resume=resume
    )
    for a, b in missing:
        msg.missing.add(start=a, end=b)
    return bytes(msg.SerializeToString())


def decode_chunk(data: bytes) -> tuple[str, int, int, bytes]:
    if len(data) > MAX_CHUNK_SIZE + 1024:
        raise InvalidArgument(f"artifact chunk is {len(data)} bytes; at most {MAX_CHUNK_SIZE}")
    msg = _parse(device_pb2.ArtifactChunk(), data, "artifact chunk")
    if len(msg.sha256) != 64 or not msg.index < msg.total <= MAX_CHUNKS:
        raise InvalidArgument(
            f"artifact chunk {msg.index} of {msg.total} for {msg.sha256[:70]!r}: expects a "
            f"64-hex digest and index < total <= {MAX_CHUNKS}"
        )
    return msg.sha256, int(msg.index), int(msg.total), msg.data


def encode_telemetry(
    *,
    device_id: str,
    seq: int,
    window_start_ms: int,
    window_end_ms: int,
    active: ModelRef | None,
    predictions: int,
    errors: int,
    latency: LatencyHistogram,
    rss_bytes: int,
    spooled: bool = False,
    drift: Sequence[DriftWindow] = (),
) -> bytes:
    msg = device_pb2.Telemetry(
        device_id=device_id,
        seq=seq,
        window_start_ms=window_start_ms,
        window_end_ms=window_end_ms,
        predictions=predictions,
        errors=errors,
        rss_bytes=rss_bytes,
        spooled=spooled,
    )
    msg.latency.CopyFrom(histogram_to_proto(latency))
    if active is not None:
        msg.active.CopyFrom(_ref(active))
    for w in drift:
        sk = msg.drift.add(
            model=_ref(w.model), rows=w.counts.rows, predictions=w.counts.predictions.tolist()
        )
        for c in w.counts.inputs:
            sk.inputs.add(counts=c.tolist())
    return bytes(msg.SerializeToString())


def _shadow_stats(st: ShadowStats) -> device_pb2.ShadowModelStats:
    return device_pb2.ShadowModelStats(
        model=_ref(st.model),
        latency_p50_us=st.latency_p50_us,
        latency_p95_us=st.latency_p95_us,
        latency_mean_us=st.latency_mean_us,
        memory_bytes=st.memory_bytes,
        correct=st.correct,
    )


def encode_shadow_report(
    *,
    device_id: str,
    generation: int,
    rollout_id: str,
    active: ShadowStats | None,
    candidate: ShadowStats,
    samples: int,
    agreed: int,
    labelled: int,
    errors: int,
    dropped: int,
    rss_bytes: int,
    started_ms: int,
    timestamp_ms: int,
) -> bytes:
    msg = device_pb2.ShadowReport(
        device_id=device_id,
        generation=generation,
        rollout_id=rollout_id,
        candidate=_shadow_stats(candidate),
        samples=samples,
        agreed=agreed,
        labelled=labelled,
        errors=errors,
        dropped=dropped,
        rss_bytes=rss_bytes,
        started_ms=started_ms,
        timestamp_ms=timestamp_ms,
    )
    if active is not None:
        msg.active.CopyFrom(_shadow_stats(active))
    return bytes(msg.SerializeToString())


def mark_spooled(payload: bytes) -> bytes:
    msg = device_pb2.Telemetry()
    msg.ParseFromString(payload)
    msg.spooled = True
    return bytes(msg.SerializeToString())


#: An acknowledgement naming more ranges than this is refused (a spool holds at most
#: tens of thousands of windows; the coordinator sends one range per batch and device).
MAX_ACK_RANGES = 10_000


def decode_telemetry_ack(device_id: str, data: bytes) -> list[tuple[int, int]]:
    """The committed `seq` ranges (inclusive) of a `TelemetryAck` for this device;
    `InvalidArgument` for one that does not parse, names another device or is too large."""
    msg = _parse(device_pb2.TelemetryAck(), data, "telemetry ack")
    if msg.device_id != device_id:
        raise InvalidArgument(
            f"telemetry ack names device {msg.device_id!r}; this is {device_id!r}"
        )
    if len(msg.committed) > MAX_ACK_RANGES:
        raise InvalidArgument(
            f"telemetry ack for {device_id!r} has {len(msg.committed)} ranges; "
            f"accepted: at most {MAX_ACK_RANGES}"
        )
    out = []
    for r in msg.committed:
        if r.first > r.last:
            raise InvalidArgument(
                f"telemetry ack for {device_id!r}: range {r.first}-{r.last} is reversed"
            )
        out.append((int(r.first), int(r.last)))
    return out


def telemetry_seq(payload: bytes) -> int:
    """The `seq` of an encoded `Telemetry` window (0 when it does not parse)."""
    msg = device_pb2.Telemetry()
    try:
        msg.ParseFromString(payload)
    except Exception:
        return 0
    return int(msg.seq)
