"""Model manifests: the signed statement of what a variant's bytes are.

The coordinator signs the *serialized* manifest with Ed25519 and ships both, so the
verifier checks exactly the bytes it was given and needs no canonical form. The
device (and `fleet models verify`) trusts a variant only when the signature checks
against a key it already holds and the artifact's sha256 and size match.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from edgefleet.protos.errors import DataLoss, InvalidArgument, Unauthenticated
from edgefleet.protos.fleet.v1 import model_pb2

DTYPES: dict[str, int] = {
    "float32": model_pb2.DTYPE_FLOAT32,
    "float16": model_pb2.DTYPE_FLOAT16,
    "int8": model_pb2.DTYPE_INT8,
    "uint8": model_pb2.DTYPE_UINT8,
    "int32": model_pb2.DTYPE_INT32,
    "int64": model_pb2.DTYPE_INT64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

RUNTIMES: dict[str, int] = {
    "onnxruntime": model_pb2.RUNTIME_ONNXRUNTIME,
    "litert": model_pb2.RUNTIME_LITERT,
}
_RUNTIME_NAMES = {v: k for k, v in RUNTIMES.items()}
#: `ModelManifest.kind` of an agent release (a tar of the agent's wheels for one platform)
AGENT_KIND = "agent"
KINDS = ("", AGENT_KIND)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; -1 marks a dynamic dimension (the batch axis)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgument(
                f"tensor {self.name!r}: dtype {self.dtype!r} is not supported; "
                f"supported: {', '.join(DTYPES)}"
            )

    def describe(self) -> str:
        dims = ",".join("N" if d < 0 else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> TensorSpec:
        shape = d["shape"]
        assert isinstance(shape, Sequence)
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(int(x) for x in shape))


@dataclass(frozen=True)
class GoldenSample:
    """An input and the output the model must give for it, within `atol`."""

    input: bytes
    input_shape: tuple[int, ...]
    output: bytes
    output_shape: tuple[int, ...]
    atol: float


@dataclass(frozen=True)
class DriftReference:
    """A version's reference sketch (see `models.sketch`): per input feature its bin
    edges and the holdout's share per bin, and the share per predicted class."""

    scheme: int
    features: tuple[str, ...]
    edges: tuple[tuple[float, ...], ...]
    inputs: tuple[tuple[float, ...], ...]
    predictions: tuple[float, ...]
    samples: int

    def __post_init__(self) -> None:
        if not len(self.features) == len(self.edges) == len(self.inputs):
            raise InvalidArgument(
                f"drift reference: {len(self.features)} features, {len(self.edges)} edge lists "
                f"and {len(self.inputs)} proportion lists; expected one of each per feature"
            )
        for name, e, p in zip(self.features, self.edges, self.inputs, strict=True):
            if len(p) != len(e) + 1:
                raise InvalidArgument(
                    f"drift reference feature {name!r}: {len(p)} proportions for "
                    f"{len(e)} edges; expected edges + 1"
                )


@dataclass(frozen=True)
class Manifest:
    model: str
    version: int
    variant: str
    runtime: str
    sha256: str
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created_at_ms: int
    labels: Mapping[str, str] = field(default_factory=dict)
    golden: GoldenSample | None = None
    requires: tuple[str, ...] = ()
    drift: DriftReference | None = None
    #: "" for a model variant; AGENT_KIND for an agent release (docs/agent.md)
    kind: str = ""

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}/{self.variant}"


@dataclass(frozen=True)
class SignedManifest:
    manifest_bytes: bytes
    signature: bytes
    key_id: str

    def to_bytes(self) -> bytes:
        msg = model_pb2.SignedManifest(
            manifest=self.manifest_bytes, signature=self.signature, key_id=self.key_id
        )
        return msg.SerializeToString(deterministic=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedManifest:
        msg = model_pb2.SignedManifest()
        try:
            msg.ParseFromString(data)
        except DecodeError as e:
            raise InvalidArgument(
                f"signed manifest ({len(data)} bytes) is not valid protobuf: {e}"
            ) from e
        if not msg.manifest or not msg.signature:
            raise InvalidArgument("signed manifest lacks the manifest bytes or the signature")
        return cls(manifest_bytes=msg.manifest, signature=msg.signature, key_id=msg.key_id)


# -- encoding ---------------------------------------------------------------------


def encode_manifest(m: Manifest) -> bytes:
    if m.kind not in KINDS:
        raise InvalidArgument(f"manifest {m.ref}: kind {m.kind!r} unknown; supported: model, agent")
    if m.kind == AGENT_KIND and m.runtime:
        raise InvalidArgument(f"agent release {m.ref}: has runtime {m.runtime!r}; it needs none")
    if m.kind != AGENT_KIND and m.runtime not in RUNTIMES:
        raise InvalidArgument(
            f"manifest {m.ref}: runtime {m.runtime!r} unknown; supported: {', '.join(RUNTIMES)}"
        )
    msg = model_pb2.ModelManifest(
        model=m.model,
        version=m.version,
        variant=m.variant,
        runtime=RUNTIMES.get(m.runtime, model_pb2.RUNTIME_UNSPECIFIED),  # type: ignore[arg-type]
        sha256=m.sha256,
        kind=m.kind,
        size=m.size,
        created_at_ms=m.created_at_ms,
        requires=list(m.requires),
    )
    for spec, target in ((m.inputs, msg.inputs), (m.outputs, msg.outputs)):
        for t in spec:
            target.add(name=t.name, dtype=DTYPES[t.dtype], shape=list(t.shape))
    msg.labels.update(dict(m.labels))
    if m.golden is not None:
        g = m.golden
        msg.golden.CopyFrom(
            model_pb2.GoldenSample(
                input=g.input,
                input_shape=list(g.input_shape),
                output=g.output,
                output_shape=list(g.output_shape),
                atol=g.atol,
            )
        )
    if m.drift is not None:
        msg.drift.CopyFrom(drift_reference_to_proto(m.drift))
    return msg.SerializeToString(deterministic=True)


def drift_reference_to_proto(r: DriftReference) -> model_pb2.DriftReference:
    msg = model_pb2.DriftReference(
        scheme=r.scheme, predictions=list(r.predictions), samples=r.samples
    )
    for name, edges, props in zip(r.features, r.edges, r.inputs, strict=True):
        msg.inputs.add(name=name, edges=list(edges), proportions=list(props))
    return msg


def drift_reference_from_proto(msg: model_pb2.DriftReference) -> DriftReference:
    return DriftReference(
        scheme=msg.scheme,
        features=tuple(f.name for f in msg.inputs),
        edges=tuple(tuple(f.edges) for f in msg.inputs),
        inputs=tuple(tuple(f.proportions) for f in msg.inputs),
        predictions=tuple(msg.predictions),
        samples=msg.samples,
    )


def decode_manifest(data: bytes) -> Manifest:
    msg = model_pb2.ModelManifest()
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise InvalidArgument(f"manifest ({len(data)} bytes) is not valid protobuf: {e}") from e
    if msg.kind not in KINDS:
        raise InvalidArgument(
            f"manifest {msg.model}:{msg.version}/{msg.variant}: kind {msg.kind!r} unknown; "
            "this agent knows model variants and agent releases"
        )
    if msg.runtime not in _RUNTIME_NAMES and msg.kind != AGENT_KIND:
        raise InvalidArgument(
            f"manifest {msg.model}:{msg.version}/{msg.variant}: runtime {msg.runtime} unknown; "
            f"supported: {', '.join(RUNTIMES)}"
        )

    def specs(ts: Sequence[model_pb2.TensorSpec]) -> tuple[TensorSpec, ...]:
        out = []
        for t in ts:
            if t.dtype not in _DTYPE_NAMES:
                raise InvalidArgument(f"manifest tensor {t.name!r}: dtype code {t.dtype} unknown")
            out.append(TensorSpec(t.name, _DTYPE_NAMES[t.dtype], tuple(t.shape)))
        return tuple(out)

    golden = None
    if msg.HasField("golden"):
        g = msg.golden
        golden = GoldenSample(
            g.input, tuple(g.input_shape), g.output, tuple(g.output_shape), g.atol
        )
    return Manifest(
        model=msg.model,
        version=msg.version,
        variant=msg.variant,
        runtime=_RUNTIME_NAMES.get(msg.runtime, ""),
        sha256=msg.sha256,
        size=msg.size,
        inputs=specs(msg.inputs),
        outputs=specs(msg.outputs),
        created_at_ms=msg.created_at_ms,
        labels=dict(msg.labels),
        golden=golden,
        requires=tuple(msg.requires),
        drift=drift_reference_from_proto(msg.drift) if msg.HasField("drift") else None,
        kind=msg.kind,
    )


# -- keys and signatures ------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


#: DER SubjectPublicKeyInfo of an Ed25519 key (RFC 8410) up to its 32 raw bytes
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC = re.compile(
    rb"-----BEGIN PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)-----END PUBLIC KEY-----"
)


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    # the one form keys take here, read without cryptography's serialization package
    # (3 MB of the agent's RSS, with its SSH and cipher modules); anything else goes
    # to cryptography's loader, which reads it or says why not
    m = _PEM_PUBLIC.fullmatch(pem.strip())
    if m is not None:
        try:
            der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except binascii.Error:
            der = b""
        if len(der) == len(_ED25519_SPKI) + 32 and der.startswith(_ED25519_SPKI):
            return Ed25519PublicKey.from_public_bytes(der[len(_ED25519_SPKI) :])
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise InvalidArgument(f"public key is not a PEM Ed25519 key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgument(f"public key is {type(key).__name__}; only Ed25519 is accepted")
    return key


def sign_manifest(m: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    data = encode_manifest(m)
    return SignedManifest(data, private_key.sign(data), key_id(private_key.public_key()))


def verify_manifest(signed: SignedManifest, public_key: Ed25519PublicKey) -> Manifest:
    """Check the signature, then parse. Raises `Unauthenticated` on any mismatch."""
    expected = key_id(public_key)
    if signed.key_id != expected:
        raise Unauthenticated(
            f"manifest signed by key {signed.key_id or '(none)'}; this verifier trusts key {expected}"
        )
    try:
        public_key.verify(signed.signature, signed.manifest_bytes)
    except InvalidSignature:
        raise Unauthenticated(
            f"manifest signature does not verify with key {expected}: manifest or signature altered"
        ) from None
    return decode_manifest(signed.manifest_bytes)


def check_artifact(manifest: Manifest, data: bytes) -> None:
    """Raise `DataLoss` unless `data` is exactly the artifact the manifest names."""
    if len(data) != manifest.size:
        raise DataLoss(
            f"artifact for {manifest.ref} is {len(data)} bytes; manifest says {manifest.size} "
            "(truncated or padded)"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise DataLoss(
            f"artifact for {manifest.ref} has sha256 {digest[:16]}…; manifest says "
            f"{manifest.sha256[:16]}… (corrupted or tampered)"
        )
