"""Self-test: a freshly loaded model must reproduce the manifest's golden output."""

from __future__ import annotations

import numpy as np

from edgefleet.models.runtime import ModelSession, open_session
from edgefleet.protos.errors import SelfTestFailed
from edgefleet.protos.manifest import Manifest


def self_test(manifest: Manifest, model: bytes, session: ModelSession | None = None) -> float:
    """Run the golden input; return the largest difference, or raise `SelfTestFailed`."""
    g = manifest.golden
    if g is None:
        raise SelfTestFailed(f"manifest {manifest.ref} carries no golden sample to self-test with")
    s = session or open_session(model, manifest.runtime)
    dtype = manifest.inputs[0].dtype if manifest.inputs else "float32"
    x = np.frombuffer(g.input, dtype=np.dtype(dtype)).reshape(g.input_shape)
    want = np.frombuffer(g.output, dtype=np.float32).reshape(g.output_shape)
    got = s.run(x).astype(np.float32)
    if got.shape != want.shape:
        raise SelfTestFailed(
            f"self-test of {manifest.ref}: output shape {got.shape}, golden {want.shape}"
        )
    diff = float(np.abs(got - want).max())
    if diff > g.atol:
        raise SelfTestFailed(
            f"self-test of {manifest.ref} failed: outputs differ by {diff:.3g} > tolerance {g.atol:.3g}"
        )
    return diff
