"""Building on the variant catalogue (`protos.variants`): gating, measuring and signing
each deployable variant; their builders are `cloud.quantize.BUILDERS`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.artifacts import ArtifactStore
from edgefleet.cloud.artifacts.base import digest
from edgefleet.cloud.evaluation import EvalSet, evaluate
from edgefleet.cloud.registry import NewVariant
from edgefleet.models.sketch import MIN_REFERENCE_ROWS, build_reference, classes
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.manifest import (
    DriftReference,
    GoldenSample,
    Manifest,
    TensorSpec,
    sign_manifest,
)
from edgefleet.protos.variants import KINDS as KINDS
from edgefleet.protos.variants import VariantKind as VariantKind

logger = logging.getLogger(__name__)


DEFAULT_VARIANTS = ("int8", "fp16", "tflite-fp32", "tflite-int8")
DEFAULT_MAX_DROP = 1.0  # accuracy points


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in KINDS or n == "fp32"]
    if bad or not names:
        accepted = ", ".join(k for k in KINDS if k != "fp32")
        raise InvalidArgument(
            f"--variants {text!r}: unknown {', '.join(bad) or '(empty)'}; accepted: {accepted}"
        )
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class BuiltVariant:
    """A variant's bytes, measured, not yet signed (signing needs the version number)."""

    kind: VariantKind
    data: bytes
    sha256: str
    quantization: dict[str, Any]
    accuracy: float | None
    latency_ms: dict[str, float]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    golden: GoldenSample
    deployable: bool
    reason: str
    drift: DriftReference | None = None


def drift_reference(x: np.ndarray, outputs: np.ndarray) -> DriftReference | None:
    """The version's drift reference from holdout inputs and this variant's outputs on them;
    None when the holdout is too small to have meaningful deciles (no drift monitoring)."""
    if len(x) < MIN_REFERENCE_ROWS:
        logger.info("holdout of %d rows: no drift reference (needs %d)", len(x), MIN_REFERENCE_ROWS)
        return None
    predicted = classes(outputs)
    n_classes = int(outputs.reshape(len(outputs), -1).shape[1]) if outputs.ndim >= 2 else 0
    n_classes = max(n_classes, int(predicted.max()) + 1 if len(predicted) else 1)
    return build_reference(x, predicted, n_classes)


def measure(
    kind: VariantKind,
    data: bytes,
    quantization: dict[str, Any],
    evalset: EvalSet,
    *,
    baseline_accuracy: float | None,
    max_drop: float,
    latency_runs: int = 100,
) -> BuiltVariant:
    """Evaluate `data` in its runtime and apply the accuracy gate."""
    ev = evaluate(data, kind.runtime, evalset, latency_runs=latency_runs)
    x1 = np.ascontiguousarray(evalset.x[:1].astype(np.float32))
    y1 = np.ascontiguousarray(ev.first_output.astype(np.float32))
    tol = kind.golden_tolerance * max(1.0, float(np.abs(y1).max()))
    golden = GoldenSample(x1.tobytes(), x1.shape, y1.tobytes(), y1.shape, tol)
    deployable, reason = True, ""
    if ev.accuracy is not None and baseline_accuracy is not None:
        drop = (baseline_accuracy - ev.accuracy) * 100.0
        if drop > max_drop:
            deployable = False
            reason = (
                f"accuracy {ev.accuracy:.2%} is {drop:.2f} points below fp32 "
                f"({baseline_accuracy:.2%}); max drop {max_drop:g}"
            )
    return BuiltVariant(
        kind,
        data,
        digest(data),
        quantization,
        ev.accuracy,
        ev.latency_ms,
        ev.inputs,
        ev.output_specs,
        golden,
        deployable,
        reason,
        drift_reference(evalset.x, ev.outputs),
    )


def sign_variants(
    built: Sequence[BuiltVariant],
    *,
    model: str,
    labels: dict[str, str],
    store: ArtifactStore,
    key: Ed25519PrivateKey,
) -> Callable[[int], list[NewVariant]]:
    """Store the bytes now; sign manifests once the version number is known."""
    for b in built:
        store.put(b.data)

    def make(version: int) -> list[NewVariant]:
        out = []
        now = int(time.time() * 1000)
        for b in built:
            manifest = Manifest(
                model=model,
                version=version,
                variant=b.kind.name,
                runtime=b.kind.runtime,
                sha256=b.sha256,
                size=len(b.data),
                inputs=b.inputs,
                outputs=b.outputs,
                created_at_ms=now,
                labels={**labels, "quantization": str(b.quantization.get("mode", ""))},
                golden=b.golden,
                requires=("dynamic-int8",)
                if b.quantization.get("mode") == "dynamic" and b.kind.runtime == "litert"
                else (),
                drift=b.drift,
            )
            signed = sign_manifest(manifest, key)
            out.append(
                NewVariant(
                    name=b.kind.name,
                    runtime=b.kind.runtime,
                    sha256=b.sha256,
                    size=len(b.data),
                    accuracy=b.accuracy,
                    latency_ms=b.latency_ms,
                    quantization=b.quantization,
                    deployable=b.deployable,
                    reason=b.reason,
                    signed_manifest=signed.to_bytes(),
                )
            )
        return out

    return make
