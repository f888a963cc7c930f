"""Drift sketches and PSI (models/sketch.py), the manifest field that carries a version's
reference, and the agent's per-window sketches over a real ONNX model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgefleet.agent.drift import FOLD_ROWS, DriftMonitor
from edgefleet.agent.inference import ModelHolder, load
from edgefleet.agent.serde import encode_telemetry
from edgefleet.cloud.telemetry.ingest import decode
from edgefleet.models.sketch import (
    FEATURES,
    MIN_SAMPLES,
    Counts,
    build_reference,
    classes,
    features,
    psi,
    score,
    sketch,
)
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.manifest import decode_manifest, encode_manifest
from tests.unit.test_inference_server import FEATURES as N_IN
from tests.unit.test_inference_server import _export, _manifest


def _data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 64)).astype(np.float32)
    return x, np.eye(10, dtype=np.float32)[rng.integers(0, 10, rows)]


def test_features_summarise_each_row() -> None:
    x = np.array([[1, 1, 3, 3], [0, 2, 0, 2]], dtype=np.float32)
    f = features(x)
    assert f.shape == (2, len(FEATURES))
    np.testing.assert_allclose(f[:, 0], [2.0, 1.0])  # mean
    np.testing.assert_allclose(f[:, 1], [1.0, 1.0])  # std
    np.testing.assert_allclose(f[:, 2], [-2.0, 0.0])  # first half minus second half
    np.testing.assert_allclose(f[:, 3], [0.0, -2.0])  # even minus odd positions
    # any shape, any dtype: rows on the first axis
    assert features(np.zeros((3, 2, 2, 2), dtype=np.uint8)).shape == (3, 4)


def test_reference_bins_the_holdout_into_deciles() -> None:
    x, y = _data(1000, 0)
    ref = build_reference(x, classes(y), 10)
    assert ref.features == FEATURES and ref.samples == 1000
    for edges, props in zip(ref.edges, ref.inputs, strict=True):
        assert len(edges) == 9 and list(edges) == sorted(edges)
        np.testing.assert_allclose(props, 0.1, atol=0.002)
    assert sum(ref.predictions) == pytest.approx(1.0)
    with pytest.raises(InvalidArgument, match="at least 50 holdout rows; got 10"):
        build_reference(x[:10], classes(y[:10]), 10)


def test_psi_is_small_for_the_same_distribution_and_large_after_a_shift() -> None:
    x, y = _data(1000, 0)
    ref = build_reference(x, classes(y), 10)
    same = score(ref, sketch(ref, *_data(MIN_SAMPLES, 1)))
    assert same.input_psi < 0.2 and same.predictions < 0.2, same
    xs, ys = _data(MIN_SAMPLES, 2)
    shifted = score(ref, sketch(ref, xs * 1.5 + 0.5, ys))
    assert shifted.inputs["mean"] > 1.0 and shifted.inputs["std"] > 1.0
    assert shifted.predictions < 0.2  # the classes did not move
    # one class only: the predictions drift, the inputs do not
    collapsed = score(ref, sketch(ref, xs, np.eye(10)[np.zeros(MIN_SAMPLES, dtype=int)]))
    assert collapsed.predictions > 1.0 and collapsed.input_psi < 0.2


def test_psi_smoothing_keeps_empty_bins_finite() -> None:
    assert psi([0.5, 0.5, 0.0], np.array([0, 0, 100]), reference_samples=100) < 20
    assert psi([0.25] * 4, np.array([25, 25, 25, 25]), reference_samples=1000) == pytest.approx(
        0.0, abs=1e-9
    )
    with pytest.raises(InvalidArgument, match="3 live bins against 2 reference bins"):
        psi([0.5, 0.5], np.array([1, 2, 3]), reference_samples=10)


def test_counts_add_up_and_refuse_other_bins() -> None:
    x, y = _data(200, 0)
    ref = build_reference(x, classes(y), 10)
    total = Counts.empty(ref)
    total.add(sketch(ref, x[:120], y[:120]))
    total.add(sketch(ref, x[120:], y[120:]))
    whole = sketch(ref, x, y)
    assert total.rows == 200
    assert all((a == b).all() for a, b in zip(total.inputs, whole.inputs, strict=True))
    other = build_reference(x, classes(y), 12)
    with pytest.raises(InvalidArgument, match="different bins"):
        total.add(Counts.empty(other))


def test_the_reference_travels_in_the_signed_manifest() -> None:
    data = _export(seed=1)
    x, y = _data(100, 0)
    m = dataclasses.replace(_manifest(data, 1), drift=build_reference(x[:, :N_IN], classes(y), 10))
    assert decode_manifest(encode_manifest(m)).drift == m.drift
    assert decode_manifest(encode_manifest(dataclasses.replace(m, drift=None))).drift is None


def test_the_agent_sketches_a_window_and_the_coordinator_decodes_it() -> None:
    data = _export(seed=1)
    rng = np.random.default_rng(0)
    holdout = rng.normal(size=(300, N_IN)).astype(np.float32)
    base = _manifest(data, 1)
    holder = ModelHolder()
    model = load(base, data)
    ref = build_reference(holdout, classes(model.run(holdout)), 10)
    holder.swap(load(dataclasses.replace(base, drift=ref), data))
    monitor = DriftMonitor()
    holder.add_observer(monitor.observe)
    rows = FOLD_ROWS + 44
    for i in range(rows):
        holder.predict(holdout[i % 300 : i % 300 + 1])
    windows = monitor.take()
    assert len(windows) == 1 and windows[0].counts.rows == rows
    assert windows[0].model.version == 1
    assert monitor.take() == []  # a new window starts empty
    payload = encode_telemetry(
        device_id="d1",
        seq=7,
        window_start_ms=0,
        window_end_ms=1000,
        active=windows[0].model,
        predictions=rows,
        errors=0,
        latency=holder.snapshot_and_reset().latency,
        rss_bytes=0,
        drift=windows,
    )
    _row, drift_rows = decode("d1", payload, received_ms=1000)
    assert len(drift_rows) == 1
    device, seq, end, model_name, version, variant, n, counts = drift_rows[0]
    assert (device, seq, end, model_name, version, variant, n) == (
        "d1",
        7,
        1000,
        "digits",
        1,
        "fp32",
        rows,
    )
    assert '"predictions":[' in counts
    # the same traffic as the holdout: no drift
    assert score(ref, windows[0].counts).input_psi < 0.2


def test_sketch_counts_every_batch_1_predict_once_per_window() -> None:
    """Batch-1 predicts of a real model, folded every FOLD_ROWS rows and at the window's
    end: each row lands in one bin per feature and one class. (Its cost per predict is
    measured by `python -m bench --only agent`.)"""
    data = _export(seed=1)
    x = np.random.default_rng(0).normal(size=(1000, N_IN)).astype(np.float32)
    base = _manifest(data, 1)
    ref = build_reference(x, classes(load(base, data).run(x)), 10)
    holder = ModelHolder()
    holder.swap(load(dataclasses.replace(base, drift=ref), data))
    monitor = DriftMonitor()
    holder.add_observer(monitor.observe)
    assert FOLD_ROWS < 1000  # some rows are folded early, the rest at take()
    for i in range(1000):
        holder.predict(x[i : i + 1])
    (window,) = monitor.take()
    assert window.counts.rows == 1000
    assert [int(c.sum()) for c in window.counts.inputs] == [1000] * len(FEATURES)
    assert int(window.counts.predictions.sum()) == 1000
    # the same as sketching all rows at once
    whole = sketch(ref, x, load(base, data).run(x))
    assert [c.tolist() for c in window.counts.inputs] == [c.tolist() for c in whole.inputs]
    assert window.counts.predictions.tolist() == whole.predictions.tolist()
    assert monitor.take() == []  # a new window starts empty
