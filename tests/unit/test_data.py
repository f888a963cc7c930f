"""Datasets: digits, user .npz / .csv, validation errors, stratified split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.models.data import from_arrays, load_dataset, split
from edgefleet.protos.errors import InvalidArgument, NotFound


def test_digits_shape_and_classes() -> None:
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.classes == tuple(str(i) for i in range(10))
    assert len(ds.digest) == 64


def test_split_is_stratified_and_reproducible() -> None:
    ds = load_dataset("digits")
    tr, ho = split(ds, holdout=0.2, seed=1)
    tr2, ho2 = split(ds, holdout=0.2, seed=1)
    assert len(tr) + len(ho) == len(ds)
    assert np.array_equal(ho.y, ho2.y) and np.array_equal(tr.x, tr2.x)
    counts = np.bincount(ho.y, minlength=10)
    assert counts.min() >= 30  # every class present in the holdout
    _, ho3 = split(ds, holdout=0.2, seed=2)
    assert not np.array_equal(ho.x, ho3.x)


def test_npz_and_csv_load_with_label_mapping(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = np.array([7, 3] * 20)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.classes == ("3", "7") and set(ds.y.tolist()) == {0, 1}
    rows = "\n".join(
        ",".join(f"{v:.4f}" for v in row) + f",{lab}" for row, lab in zip(x, y, strict=True)
    )
    (tmp_path / "d.csv").write_text("a,b,c,label\n" + rows + "\n")
    csv = load_dataset(str(tmp_path / "d.csv"))
    assert csv.x.shape == (40, 3) and np.allclose(csv.x, x, atol=1e-4)
    assert np.array_equal(csv.y, ds.y)


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such file"):
        load_dataset(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "wrong.npz", features=np.zeros((20, 2)), labels=np.zeros(20))
    with pytest.raises(InvalidArgument, match=r"expected 'X' and 'y'"):
        load_dataset(str(tmp_path / "wrong.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidArgument, match="not a readable .npz"):
        load_dataset(str(tmp_path / "junk.npz"))
    (tmp_path / "m.parquet").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="accepted: .npz"):
        load_dataset(str(tmp_path / "m.parquet"))
    with pytest.raises(InvalidArgument, match=r"y has shape \(19,\)"):
        from_arrays("d", np.zeros((20, 2)), np.zeros(19))
    with pytest.raises(InvalidArgument, match="NaN"):
        from_arrays("d", np.full((20, 2), np.nan), np.arange(20) % 2)
    with pytest.raises(InvalidArgument, match="at least 2 needed"):
        from_arrays("d", np.zeros((20, 2)), np.zeros(20))
