"""Model-aware deltas: per (base artifact -> target artifact) pair the fleet needs, the
smallest signed delta (tensor-level for ONNX, binary otherwise), kept only when it is
well under the full artifact. The wire format is `edgefleet.protos.delta`."""

from edgefleet.cloud.deltas.build import KEEP_RATIO, BuiltDelta, build_delta
from edgefleet.cloud.deltas.cache import DeltaCache
from edgefleet.cloud.deltas.store import DeltaRecord, DeltaStore

__all__ = ["KEEP_RATIO", "BuiltDelta", "DeltaCache", "DeltaRecord", "DeltaStore", "build_delta"]
