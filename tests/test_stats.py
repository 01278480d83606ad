"""CrossStats / StatsGrid: streamed float64 statistics equal those of the concatenated data."""

from __future__ import annotations

import pytest
import torch

from xlens_align.stats import CHUNK_ROWS, CrossStats, StatsGrid


def _data(n=1000, dx=7, dy=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dx, generator=g, dtype=torch.float64) * 3 + 10
    Y = X[:, :dy] @ torch.randn(dy, dy, generator=g, dtype=torch.float64) + torch.randn(
        n, dy, generator=g, dtype=torch.float64
    )
    return X, Y


def test_streamed_equals_concatenated():
    X, Y = _data()
    st = CrossStats.empty(7, 5)
    for lo, hi in [(0, 1), (1, 40), (40, 41), (41, 513), (513, 1000)]:  # uneven batches, a 1-row one
        st.update(X[lo:hi], Y[lo:hi])
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    assert st.n == 1000
    torch.testing.assert_close(st.mean_x, X.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(st.cov_xx, Xc.T @ Xc / 999, atol=1e-10, rtol=0)
    torch.testing.assert_close(st.cov_yy, Yc.T @ Yc / 999, atol=1e-10, rtol=0)
    torch.testing.assert_close(st.cov_xy, Xc.T @ Yc / 999, atol=1e-10, rtol=0)
    torch.testing.assert_close(st.xty, X.T @ Y, atol=1e-8, rtol=0)
    torch.testing.assert_close(st.xtx, X.T @ X, atol=1e-8, rtol=0)


def test_merge_is_exact_and_order_free():
    X, Y = _data(seed=1)
    a = CrossStats.from_data(X[:300], Y[:300])
    b = CrossStats.from_data(X[300:], Y[300:])
    whole = CrossStats.from_data(X, Y)
    merged = CrossStats.from_data(X[300:], Y[300:]).merge_(CrossStats.from_data(X[:300], Y[:300]))
    a.merge_(b)
    for st in (a, merged):
        torch.testing.assert_close(st.sxy, whole.sxy, atol=1e-9, rtol=0)
        torch.testing.assert_close(st.x.s, whole.x.s, atol=1e-9, rtol=0)
    sd = whole.state_dict()
    back = CrossStats.from_state_dict(sd)
    assert back.n == whole.n and torch.equal(back.sxy, whole.sxy)


def test_from_data_in_chunks_equals_whole_and_maps_x_chunks():
    X, Y = _data(n=1000, seed=3)
    whole = CrossStats.empty(7, 5).update(X, Y)
    assert CHUNK_ROWS == 16384
    for chunk in (1, 7, 999, 1000, CHUNK_ROWS):
        st = CrossStats.from_data(X, Y, chunk=chunk)
        assert st.n == 1000 and st.sxy.device == X.device
        torch.testing.assert_close(st.sxy, whole.sxy, atol=1e-9, rtol=0)
        torch.testing.assert_close(st.x.s, whole.x.s, atol=1e-9, rtol=0)
        torch.testing.assert_close(st.mean_y, whole.mean_y, atol=1e-12, rtol=0)
    seen = []

    def clip(x):
        seen.append((x.dtype, x.shape[0]))
        return x.clamp(max=11.0)

    st = CrossStats.from_data(X.float(), Y, chunk=300, map_x=clip)
    assert seen == [(torch.float64, 300)] * 3 + [(torch.float64, 100)]
    ref = CrossStats.from_data(X.float().double().clamp(max=11.0), Y)
    torch.testing.assert_close(st.x.s, ref.x.s, atol=1e-9, rtol=0)
    torch.testing.assert_close(st.sxy, ref.sxy, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        CrossStats.from_data(X, Y, chunk=0)
    with pytest.raises(ValueError, match=r"Y must have shape \[n, d\]"):
        CrossStats.from_data(X, Y[:, 0])
    bad = X.clone()
    bad[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"X contains 1 non-finite.*rows: \[5\]"):
        CrossStats.from_data(bad, Y, chunk=4)


def test_half_precision_input_accumulates_in_float64():
    X = torch.full((64, 4), 300.0, dtype=torch.float16)  # squares (9e4) overflow fp16
    X[::2] = -300.0
    st = CrossStats.from_data(X, X)
    assert st.sxy.dtype == torch.float64
    assert torch.isfinite(st.xtx).all() and st.xtx[0, 0] == 64 * 300.0**2


def test_grid_matches_pairwise_stats():
    g = torch.Generator().manual_seed(2)
    acts_a = {p: torch.randn(500, 6, generator=g) for p in ("a0", "a1")}
    acts_b = {p: torch.randn(500, 3, generator=g) + 5 for p in ("b0", "b1", "b2")}
    grid = StatsGrid(["a0", "a1"], ["b0", "b1", "b2"])
    for lo in range(0, 500, 77):
        grid.update(
            {k: v[lo : lo + 77] for k, v in acts_a.items()}, {k: v[lo : lo + 77] for k, v in acts_b.items()}
        )
    for pa in acts_a:
        for pb in acts_b:
            direct = CrossStats.from_data(acts_a[pa], acts_b[pb])
            st = grid[pa, pb]
            torch.testing.assert_close(st.cov_xy, direct.cov_xy, atol=1e-10, rtol=0)
            torch.testing.assert_close(st.cov_yy, direct.cov_yy, atol=1e-10, rtol=0)
    st = grid["a0", "b0"]
    st.merge_(CrossStats.from_data(acts_a["a0"][:10], acts_b["b0"][:10]))
    assert grid["a0", "b0"].n == 500  # the grid is not mutated through a returned view


def test_errors():
    st = CrossStats.empty(3, 2)
    with pytest.raises(ValueError, match="same number of rows"):
        st.update(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"expected X \[n, 3\]"):
        st.update(torch.randn(4, 4), torch.randn(4, 2))
    bad = torch.randn(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"X contains 1 non-finite.*rows: \[2\]"):
        st.update(bad, torch.randn(4, 2))
    with pytest.raises(ValueError, match="need at least 2"):
        _ = CrossStats.empty(3, 2).cov_xy
    with pytest.raises(ValueError, match="d_x must be a positive int"):
        CrossStats.empty(0, 2)
    with pytest.raises(ValueError, match="lacks points"):
        StatsGrid(["a"], ["b"]).update({}, {"b": torch.randn(3, 2)})
    with pytest.raises(KeyError, match=r"\('a', 'zz'\) is not among the grid's pairs \[\('a', 'b'\)\]"):
        StatsGrid(["a"], ["b"])["a", "zz"]
    empty = StatsGrid(["a"], ["b"]).update({"a": torch.randn(0, 3)}, {"b": torch.randn(0, 2)})
    with pytest.raises(ValueError, match=r"pair \('a', 'b'\): the grid holds 0 rows.*row filters dropped"):
        empty["a", "b"]
