"""Views of the residual stream for similarity grids: raw, RMS-normalised rows, standardized dimensions."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import xlens_align.similarity as S
from xlens_align.similarity.views import VIEW_LABELS, ColumnStats, view


def _pair(n: int = 600, d: int = 24, seed: int = 0):
    """Y = a rotation of X plus noise; Xm = X with a planted massive dimension: dim 0 = 1000 on
    every 20th row (as Llama-like models do on BOS and the first delimiter)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Y = X @ Q + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    Xm = X.clone()
    Xm[::20, 0] = 1000.0
    return X, Xm, Y


def test_rms_view_is_invariant_to_row_scaling():
    X, _, _ = _pair()
    s = torch.rand(X.shape[0], 1, dtype=torch.float64) * 1e3 + 1e-3
    v = view(X, "rms")
    torch.testing.assert_close(view(X * s, "rms"), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v.square().mean(1), torch.ones(X.shape[0], dtype=torch.float64))
    assert view(torch.zeros(3, 4), "rms").abs().sum() == 0  # a zero row stays zero, no NaN
    assert view(X.float(), "rms").dtype == torch.float32


def test_standardized_view_is_invariant_to_dimension_scaling():
    X, _, _ = _pair()
    c = torch.rand(X.shape[1], dtype=torch.float64) * 1e4 + 1e-4
    v = view(X, "standardized")
    torch.testing.assert_close(view(X * c + 7.0, "standardized"), v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v.mean(0), torch.zeros(X.shape[1], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(v.std(0, correction=0), torch.ones(X.shape[1], dtype=torch.float64))
    const = torch.cat([X[:, :2], torch.full((X.shape[0], 1), 5.0, dtype=torch.float64)], 1)
    assert view(const, "standardized")[:, 2].abs().sum() == 0  # a constant dimension becomes 0
    assert view(X, "raw") is X


def test_column_stats_merge_batches_exactly():
    X, Xm, _ = _pair()
    st = ColumnStats()
    for i in range(0, X.shape[0], 37):  # uneven batches, one with the massive rows' offset mean
        st.update(Xm[i : i + 37] + 1e6)
    torch.testing.assert_close(st.mean, Xm.mean(0) + 1e6, rtol=1e-15, atol=1e-8)
    torch.testing.assert_close(st.std, Xm.std(0, correction=0), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="view must be one of"):
        view(X, "zscore")


def test_planted_massive_dimension_dominates_raw_cka_only():
    X, Xm, Y = _pair()
    batches = [({"x": Xm[i : i + 100]}, {"y": Y[i : i + 100]}) for i in range(0, X.shape[0], 100)]
    clean = float(S.cka(X, Y))
    got = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the raw grid warns about the massive rows: that is the point
        for v in VIEW_LABELS:
            g = S.grid_from_batches(batches, "cka", view=v, minibatch_size=200)
            assert g.view == v and VIEW_LABELS[v] in g.figure().layout.title.text
            got[v] = float(g.values[0, 0])
    assert clean > 0.9
    assert abs(got["raw"]) < 0.02  # 5% of rows with one dimension at 1000: raw CKA sees only them
    assert got["rms"] > 0.78 and got["standardized"] > 0.85


def test_standardized_grid_uses_all_rows_statistics():
    """The column statistics are those of every row used, not of the first batch: the grid equals
    the pure measure on the whole-data view (biased full-data CKA from streamed moments)."""
    X, Xm, Y = _pair()
    Y = Y.clone()
    Y[150:, :12] *= 20.0  # after the first batch, half of B's dimensions spread 20x wider
    batches = [({"x": Xm[i : i + 150]}, {"y": Y[i : i + 150]}) for i in range(0, X.shape[0], 150)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the massive rows
        g = S.grid_from_batches(batches, "cka_feature", view="standardized")
    want = float(S.cka(view(Xm, "standardized"), view(Y, "standardized"), debiased=False))
    assert float(g.values[0, 0]) == pytest.approx(want, rel=1e-10)
    first = ColumnStats().update(Xm[:150]), ColumnStats().update(Y[:150])
    wrong = float(
        S.cka(view(Xm, "standardized", first[0]), view(Y, "standardized", first[1]), debiased=False)
    )
    assert abs(wrong - want) > 0.05  # the first batch alone would give another number
    back = S.Grid.from_json(g.to_json())
    assert back.view == "standardized" and json.loads(g.to_json())["view"] == "standardized"
    with pytest.raises(ValueError, match="re-iterable"):
        S.grid_from_batches(iter(batches), "cka_feature", view="standardized")
    with pytest.raises(ValueError, match="view must be one of"):
        S.grid_from_batches(batches, "cka", view="z")


def test_layer_grid_views_on_tiny_pair(tiny_pair):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: one intra-op thread avoids OpenMP spin-waits
    try:
        _layer_grid_views(tiny_pair)
    finally:
        torch.set_num_threads(threads)


def _layer_grid_views(tiny_pair):
    texts = [f"Sentence number {i} has words, digits {i * 37} and a comma." for i in range(12)]
    pts = ["resid_post.0", "resid_post.1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grids = {
            v: S.layer_grid(tiny_pair, texts, "cka_feature", pts, pts, progress=False, view=v)
            for v in VIEW_LABELS
        }
    assert {g.view for g in grids.values()} == set(VIEW_LABELS)
    assert len({g.n_tokens for g in grids.values()}) == 1  # one set of rows, three views
    assert all(bool(torch.isfinite(g.values).all()) for g in grids.values())
    assert not torch.allclose(grids["raw"].values, grids["standardized"].values)
