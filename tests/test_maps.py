"""Alignment maps: closed forms against direct solves, stats vs tensors, MLP, Adapter, the training
loop, save/load (old files included), errors."""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import xlens_align
import xlens_align.maps as xm
from xlens_align.files import split_indices
from xlens_align.maps import (
    CCA,
    MLP,
    Adapter,
    Affine,
    AlignmentMap,
    EmbeddingInjection,
    LowRank,
    NotFittedError,
    Procrustes,
    load,
    register,
    registry,
    training,
)
from xlens_align.stats import CrossStats

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(randn(d, d, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def aniso(n: int, d: int, seed: int, shift: float = 2.0) -> torch.Tensor:
    """Anisotropic, correlated, off-centre data."""
    return randn(n, d, seed=seed) @ randn(d, d, seed=seed + 1) + shift * randn(d, seed=seed + 2)


def streamed(X: torch.Tensor, Y: torch.Tensor, sizes: tuple[int, ...] = (37, 200, 1, 500)) -> CrossStats:
    """CrossStats accumulated over uneven batches."""
    st = CrossStats.empty(X.shape[1], Y.shape[1])
    i, k = 0, 0
    while i < X.shape[0]:
        j = i + sizes[k % len(sizes)]
        st.update(X[i:j], Y[i:j])
        i, k = j, k + 1
    return st


def centred_lstsq(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mx, my = X.mean(0), Y.mean(0)
    W = torch.linalg.lstsq(X - mx, Y - my).solution
    return W, my - mx @ W


def model(model_id: str, config_hash: str) -> SimpleNamespace:
    return SimpleNamespace(model_id=model_id, config_hash=config_hash)


# -- Procrustes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [False, True])
def test_procrustes_recovers_square_rotation(scale):
    X = aniso(400, 7, seed=1)
    R0 = orthogonal(7, seed=5)
    s0 = 2.5 if scale else 1.0
    Y = s0 * X @ R0 + 3.0
    m = Procrustes(scale=scale).fit(X, Y)
    assert torch.allclose(m.rotation_, R0, atol=1e-6)
    assert m.scale_ == pytest.approx(s0, abs=1e-6)
    assert torch.allclose(m.transform(X), Y, atol=1e-6)
    assert torch.allclose(m.rotation_.T @ m.rotation_, torch.eye(7, dtype=F64), atol=1e-10)


@pytest.mark.parametrize("scale", [False, True])
def test_procrustes_semi_orthogonal_wide(scale):
    """d_A < d_B: R has orthonormal rows."""
    da, db = 5, 9
    X = aniso(300, da, seed=11)
    R0 = orthogonal(db, seed=12)[:da]
    Y = 0.7 * X @ R0 if scale else X @ R0
    m = Procrustes(scale=scale).fit(X, Y)
    assert m.rotation_.shape == (da, db)
    assert torch.allclose(m.rotation_, R0, atol=1e-6)
    assert torch.allclose(m.rotation_ @ m.rotation_.T, torch.eye(da, dtype=F64), atol=1e-10)
    if scale:
        assert m.scale_ == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("scale", [False, True])
def test_procrustes_semi_orthogonal_tall(scale):
    """d_A > d_B: R has orthonormal columns. X's covariance keeps span(R0) invariant."""
    n, da, db = 400, 9, 4
    Z = randn(n, db, seed=20) @ randn(db, db, seed=21)
    E = 2 * randn(n, da - db, seed=22)
    Z, E = Z - Z.mean(0), E - E.mean(0)
    E = E - Z @ torch.linalg.lstsq(Z, E).solution  # exactly uncorrelated with Z
    rot = orthogonal(da, seed=23)
    X = torch.cat([Z, E], 1) @ rot + 1.5
    R0 = rot.T @ torch.cat([orthogonal(db, seed=24), torch.zeros(da - db, db, dtype=F64)])
    s0 = 1.7 if scale else 1.0
    Y = s0 * X @ R0 - 4.0
    m = Procrustes(scale=scale).fit(X, Y)
    assert torch.allclose(m.rotation_, R0, atol=1e-6)
    assert torch.allclose(m.rotation_.T @ m.rotation_, torch.eye(db, dtype=F64), atol=1e-10)
    assert m.scale_ == pytest.approx(s0, abs=1e-6)


# -- Affine -------------------------------------------------------------------------------------
def test_affine_equals_lstsq():
    X = aniso(500, 12, seed=30)
    Y = X @ randn(12, 7, seed=31) + 0.3 * randn(500, 7, seed=32) + 5
    m = Affine().fit(X, Y)
    W, b = centred_lstsq(X, Y)
    assert torch.allclose(m.weight_, W, atol=1e-8, rtol=0)
    assert torch.allclose(m.bias_, b, atol=1e-8, rtol=0)
    assert m.alpha_ == 0.0 and m.d_in_ == 12 and m.d_out_ == 7 and m.n_samples_ == 500


def test_ridge_equals_closed_form():
    X = aniso(300, 10, seed=40)
    Y = X @ randn(10, 4, seed=41) + randn(300, 4, seed=42)
    alpha = 0.37
    m = Affine(alpha=alpha).fit(X, Y)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    n = X.shape[0]
    W = torch.linalg.solve(Xc.T @ Xc / n + alpha * torch.eye(10, dtype=F64), Xc.T @ Yc / n)
    assert torch.allclose(m.weight_, W, atol=1e-10, rtol=0)
    assert torch.allclose(m.bias_, Y.mean(0) - X.mean(0) @ W, atol=1e-10, rtol=0)
    assert not torch.allclose(m.weight_, Affine().fit(X, Y).weight_, atol=1e-3)


def test_affine_cv_prefers_larger_alpha_when_noisy_and_ill_posed():
    W0 = randn(40, 5, seed=51)
    Xn = randn(60, 40, seed=52)
    noisy = Affine(alpha="cv").fit(Xn, Xn @ W0 * 0.1 + 5 * randn(60, 5, seed=53))
    Xc = randn(3000, 40, seed=54)
    clean = Affine(alpha="cv").fit(Xc, Xc @ W0 + 0.01 * randn(3000, 5, seed=55))
    assert noisy.alpha_ > 100 * clean.alpha_
    assert len(noisy.cv_alphas_) == len(noisy.cv_mse_) == 19
    assert noisy.alpha_ in noisy.cv_alphas_


def test_affine_cv_tensors_and_stats_agree_on_same_split():
    X = aniso(400, 15, seed=60)
    Y = X @ randn(15, 6, seed=61) + 3 * randn(400, 6, seed=62)
    m1 = Affine(alpha="cv", cv_fraction=0.25, seed=7).fit(X, Y)
    tr, va = split_indices(400, 0.25, 7)
    m2 = Affine(alpha="cv").fit_stats(
        streamed(X[tr], Y[tr]), val_stats=streamed(X[va], Y[va], sizes=(13, 40))
    )
    assert m1.cv_alphas_.index(m1.alpha_) == m2.cv_alphas_.index(m2.alpha_)
    assert m1.alpha_ == pytest.approx(m2.alpha_, rel=1e-12)
    assert torch.allclose(torch.tensor(m1.cv_mse_), torch.tensor(m2.cv_mse_), rtol=1e-9)
    assert torch.allclose(m1.weight_, m2.weight_, atol=1e-8, rtol=0)
    # the closed-form validation error equals a direct held-out evaluation of the train-only fit
    m3 = Affine(alpha="cv", cv_fraction=0.25, seed=7, refit=False).fit(X, Y)
    direct = Affine(alpha=m3.alpha_).fit(X[tr], Y[tr])
    assert torch.allclose(m3.weight_, direct.weight_, atol=1e-10)
    sse = (direct.transform(X[va]) - Y[va]).square().sum() / len(va)
    assert m3.cv_mse_[m3.cv_alphas_.index(m3.alpha_)] == pytest.approx(float(sse), rel=1e-9)


def test_affine_cv_fit_stats_needs_val_stats():
    X, Y = randn(50, 3, seed=1), randn(50, 2, seed=2)
    with pytest.raises(ValueError, match="val_stats"):
        Affine(alpha="cv").fit_stats(CrossStats.from_data(X, Y))
    with pytest.raises(ValueError, match="only used by Affine"):
        Affine(alpha=1.0).fit_stats(CrossStats.from_data(X, Y), val_stats=CrossStats.from_data(X, Y))


# -- LowRank and CCA ----------------------------------------------------------------------------
@pytest.mark.parametrize("da,db", [(8, 5), (5, 8)])
def test_lowrank_full_rank_equals_affine(da, db):
    X = aniso(300, da, seed=70)
    Y = X @ randn(da, db, seed=71) + randn(300, db, seed=72)
    for alpha in (0.0, 0.5):
        lr = LowRank(rank=min(da, db), alpha=alpha).fit(X, Y)
        af = Affine(alpha=alpha).fit(X, Y)
        assert torch.allclose(lr.weight_, af.weight_, atol=1e-8, rtol=0)
        assert torch.allclose(lr.bias_, af.bias_, atol=1e-8, rtol=0)


def test_lowrank_recovers_planted_rank():
    r = 3
    W0 = randn(10, r, seed=80) @ randn(r, 8, seed=81)
    X = aniso(500, 10, seed=82)
    m = LowRank(rank=r).fit(X, X @ W0 + 1.0)
    assert torch.allclose(m.weight_, W0, atol=1e-8, rtol=0)
    assert int(torch.linalg.matrix_rank(m.weight_)) == r
    # with noise the rank-r map is close to W0, the rank-(r-1) one is not
    Yn = X @ W0 + 0.05 * randn(500, 8, seed=83)
    err = (LowRank(rank=r).fit(X, Yn).weight_ - W0).norm() / W0.norm()
    err_low = (LowRank(rank=r - 1).fit(X, Yn).weight_ - W0).norm() / W0.norm()
    assert err < 0.02 < 0.1 < err_low
    assert LowRank(rank=r).fit(X, Yn).components_.shape == (8, r)


def planted_cca(n: int, rho: list[float], dx: int, dy: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = len(rho)
    r = torch.tensor(rho, dtype=F64)
    u = randn(n, k, seed=seed)
    v = r * u + (1 - r**2).sqrt() * randn(n, k, seed=seed + 1)
    X = torch.cat([u, randn(n, dx - k, seed=seed + 2)], 1) @ randn(dx, dx, seed=seed + 3)
    Y = torch.cat([v, randn(n, dy - k, seed=seed + 4)], 1) @ randn(dy, dy, seed=seed + 5)
    return X + 1.0, Y - 2.0


def test_cca_correlations_match_direct_computation():
    rho = [0.9, 0.6, 0.3]
    X, Y = planted_cca(20000, rho, 6, 5, seed=90)
    m = CCA(k=3, reg=0.0).fit(X, Y)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    n = X.shape[0]
    Lx = torch.linalg.cholesky(Xc.T @ Xc / n)
    Ly = torch.linalg.cholesky(Yc.T @ Yc / n)
    K = torch.linalg.solve_triangular(Lx, Xc.T @ Yc / n, upper=False)
    K = torch.linalg.solve_triangular(Ly, K.T, upper=False).T
    direct = torch.linalg.svdvals(K)[:3]
    assert torch.allclose(m.correlations_, direct, atol=1e-8)
    assert torch.allclose(m.correlations_, torch.tensor(rho, dtype=F64), atol=0.02)
    # canonical variates: unit variance, correlation rho, on the training data
    u = (X - X.mean(0)) @ m.x_weights_
    v = (Y - Y.mean(0)) @ m.y_weights_
    assert torch.allclose(u.T @ u / n, torch.eye(3, dtype=F64), atol=1e-8)
    assert torch.allclose((u * v).sum(0) / n, direct, atol=1e-8)
    # default reg barely moves them
    assert torch.allclose(CCA(k=3).fit(X, Y).correlations_, direct, atol=1e-4)


def test_cca_full_k_is_least_squares_and_small_k_is_worse():
    X, Y = planted_cca(3000, [0.95, 0.5], 6, 4, seed=100)
    full = CCA(k=4, reg=0.0).fit(X, Y)
    af = Affine().fit(X, Y)
    assert torch.allclose(full.weight_, af.weight_, atol=1e-8, rtol=0)
    one = CCA(k=1, reg=0.0).fit(X, Y)
    assert int(torch.linalg.matrix_rank(one.weight_)) == 1
    assert one.score(X, Y)["r2"] < full.score(X, Y)["r2"]


# -- statistics path = tensor path --------------------------------------------------------------
STAT_KINDS = [
    lambda: Procrustes(),
    lambda: Procrustes(scale=True, standardize=True),
    lambda: Affine(),
    lambda: Affine(alpha=0.3, standardize="x", whiten="y"),
    lambda: Affine(center=False),
    lambda: LowRank(rank=3, alpha=0.1),
    lambda: LowRank(rank=2, whiten=True),
    lambda: CCA(k=2),
    lambda: CCA(k=4, reg=1e-3, standardize=True),
]


@pytest.mark.parametrize("make", STAT_KINDS)
def test_fit_stats_equals_fit_tensors(make):
    X = aniso(1500, 9, seed=110, shift=4.0)
    Y = torch.tanh(X @ randn(9, 6, seed=111) / 3) + 0.1 * randn(1500, 6, seed=112) + 1.0
    a = make().fit(X, Y)
    b = make().fit_stats(streamed(X, Y))
    assert torch.allclose(a.weight_, b.weight_, atol=1e-8, rtol=0)
    assert torch.allclose(a.bias_, b.bias_, atol=1e-8, rtol=0)
    assert torch.allclose(a.transform(X), b.transform(X), atol=1e-8, rtol=0)


def test_fit_stats_from_grid_and_score_stats():
    from xlens_align.stats import StatsGrid

    X = aniso(600, 5, seed=120)
    Y = X @ randn(5, 4, seed=121) + randn(600, 4, seed=122)
    grid = StatsGrid(["a"], ["b"])
    for i in range(0, 600, 100):
        grid.update({"a": X[i : i + 100]}, {"b": Y[i : i + 100]})
    m = Affine().fit_stats(grid["a", "b"])
    assert torch.allclose(m.weight_, Affine().fit(X, Y).weight_, atol=1e-8)
    Xt, Yt = aniso(300, 5, seed=123), None
    Yt = Xt @ randn(5, 4, seed=121) + randn(300, 4, seed=124)
    s, s2 = m.score(Xt, Yt), m.score_stats(streamed(Xt, Yt))
    for key in ("r2", "r2_mean", "fvu", "mse"):
        assert s[key] == pytest.approx(s2[key], rel=1e-9, abs=1e-12)


# -- preprocessing ------------------------------------------------------------------------------
def test_preprocessing_is_recorded_and_applied():
    X = aniso(800, 6, seed=130, shift=10.0) * torch.tensor([1.0, 100, 0.01, 5, 1, 1], dtype=F64)
    Y = X @ randn(6, 3, seed=131) + randn(800, 3, seed=132)
    plain = Affine().fit(X, Y)
    # OLS is invariant to invertible input preprocessing and to target preprocessing
    for kw in (
        {"standardize": True},
        {"whiten": "x", "whiten_eps": 0.0},
        {"whiten": True, "whiten_eps": 0.0},
    ):
        assert torch.allclose(Affine(**kw).fit(X, Y).transform(X), plain.transform(X), atol=1e-6), kw
    # Procrustes on standardized data, then de-standardized
    m = Procrustes(standardize=True).fit(X, Y)
    sx, sy = X.std(0, unbiased=False), Y.std(0, unbiased=False)
    Zx, Zy = (X - X.mean(0)) / sx, (Y - Y.mean(0)) / sy
    u, _, vh = torch.linalg.svd(Zx.T @ Zy, full_matrices=False)
    expect = (Zx @ u @ vh) * sy + Y.mean(0)
    assert torch.allclose(m.transform(X), expect, atol=1e-8)
    assert torch.allclose(m.prep_y_.scale, sy, atol=1e-10) and m.prep_x_.mode == "standardize"
    # no centring: no intercept
    nc = Affine(center=False).fit(X, Y)
    assert torch.allclose(nc.bias_, torch.zeros(3, dtype=F64))
    assert torch.allclose(nc.weight_, torch.linalg.lstsq(X, Y).solution, atol=1e-6)


def test_winsorize_thresholds_from_training_quantiles():
    X = randn(1000, 4, seed=140)
    X[3, 1] = 1e4  # a massive activation
    Y = X @ randn(4, 2, seed=141)
    m = Affine(winsorize=0.99).fit(X, Y)
    lo = torch.quantile(X, 0.01, dim=0)
    hi = torch.quantile(X, 0.99, dim=0)
    assert torch.allclose(m.prep_x_.winsor_lo, lo) and torch.allclose(m.prep_x_.winsor_hi, hi)
    Xt = randn(10, 4, seed=142) * 50
    assert torch.equal(m.transform(Xt), m.transform(torch.maximum(torch.minimum(Xt, hi), lo)))
    with pytest.raises(ValueError, match="quantiles of the training rows"):
        Affine(winsorize=0.99).fit_stats(CrossStats.from_data(X, Y))
    # precomputed thresholds work with statistics of winsorized data
    Xc = X.clamp(-2.0, 2.0)
    a = Affine(winsorize=(-2.0, 2.0)).fit_stats(streamed(Xc, Y))
    assert torch.allclose(a.weight_, Affine(winsorize=(-2.0, 2.0)).fit(X, Y).weight_, atol=1e-8)
    with pytest.raises(ValueError, match="winsorize must be None, a quantile"):
        Affine(winsorize=0.3).fit(X, Y)


PREPROCESSED = [Procrustes, Affine, lambda **kw: LowRank(rank=2, **kw), lambda **kw: CCA(k=2, **kw), MLP]


@pytest.mark.parametrize("make", PREPROCESSED)
def test_preprocessing_keywords_are_declared_once(make):
    names = ["center", "standardize", "whiten", "whiten_eps", "winsorize"]
    m = make(standardize="y", winsorize=0.9)
    params = m.get_params()
    assert all(n in params for n in names)
    assert (params["standardize"], params["winsorize"], params["center"], params["whiten_eps"]) == (
        "y",
        0.9,
        True,
        1e-6,
    )
    assert "standardize='y'" in repr(m) and "whiten=" not in repr(m)
    assert m.set_params(whiten_eps=0.1) is m and m.whiten_eps == 0.1
    assert m.clone().get_params() == m.get_params()
    with pytest.raises(TypeError, match=r"clamp= is now winsorize="):
        make(clamp=0.99)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['stdize'\]"):
        make(stdize=True)
    assert make(center=False).center is False


def test_transform_keeps_dtype_device_and_leading_dims():
    X = aniso(200, 6, seed=150)
    m = Affine().fit(X, X @ randn(6, 4, seed=151))
    x32 = X[:10].float()
    out = m.transform(x32)
    assert out.dtype == torch.float32 and out.device == x32.device and out.shape == (10, 4)
    batch = X[:12].reshape(3, 4, 6)
    assert torch.allclose(m.transform(batch).reshape(12, 4), m.transform(X[:12]))


# -- scores -------------------------------------------------------------------------------------
def test_score_exact_and_shuffled():
    X = aniso(2000, 8, seed=160)
    Y = X @ randn(8, 5, seed=161) + 2.0
    s = Affine().fit(X, Y).score(X, Y)
    assert s["r2"] == pytest.approx(1.0, abs=1e-10) and s["r2_mean"] == pytest.approx(1.0, abs=1e-10)
    assert s["fvu"] == pytest.approx(0.0, abs=1e-10) and s["cosine"] == pytest.approx(1.0, abs=1e-10)
    assert Procrustes().fit(X, X @ orthogonal(8, 3)).score(X, X @ orthogonal(8, 3))["r2"] == pytest.approx(
        1.0
    )
    # shuffled pairs: the relation is gone, a map fit on them explains ~nothing held out
    Xs = aniso(6000, 8, seed=162)
    Ys = (Xs @ randn(8, 5, seed=163) + randn(6000, 5, seed=164))[torch.randperm(6000, generator=gen(165))]
    m = Affine().fit(Xs[:4000], Ys[:4000])
    held = m.score(Xs[4000:], Ys[4000:])
    assert abs(held["r2"]) < 0.02 and abs(held["r2_mean"]) < 0.02
    assert held["fvu"] == pytest.approx(1 - held["r2"])


# -- MLP ----------------------------------------------------------------------------------------
def test_mlp_beats_affine_on_nonlinear_map():
    torch.manual_seed(0)
    W = randn(6, 6, seed=170, dtype=torch.float32)
    X = randn(4000, 6, seed=171, dtype=torch.float32)
    Y = 2 * torch.tanh(X @ W)
    Xt = randn(1000, 6, seed=172, dtype=torch.float32)
    Yt = 2 * torch.tanh(Xt @ W)
    af = Affine().fit(X, Y).score(Xt, Yt)["r2"]
    mlp = MLP(hidden=64, epochs=40, batch_size=128, lr=3e-3, patience=5, progress=False).fit(X, Y)
    r2 = mlp.score(Xt, Yt)["r2"]
    assert r2 > af + 0.1 and r2 > 0.9, (r2, af)
    assert all(set(h) == {"epoch", "step", "train_loss", "val_loss"} for h in mlp.history_)
    assert mlp.transform(Xt).dtype == torch.float32


def test_mlp_early_stops_on_noise_and_is_deterministic():
    X = randn(800, 5, seed=180, dtype=torch.float32)
    Y = randn(800, 3, seed=181, dtype=torch.float32)
    kw = dict(hidden=64, epochs=200, batch_size=64, lr=1e-2, patience=3, progress=False, seed=4)
    a = MLP(**kw).fit(X, Y)
    assert len(a.history_) < 200 and a.stopped_early_
    b = MLP(**kw).fit(X, Y)
    assert a.history_ == b.history_
    assert torch.equal(a.transform(X), b.transform(X))


def test_mlp_fit_stream_and_cosine_loss():
    W = randn(4, 3, seed=190, dtype=torch.float32)
    X = randn(2000, 4, seed=191, dtype=torch.float32)
    Y = torch.tanh(X @ W) + 0.5
    Xv, Yv = X[1600:], Y[1600:]
    batches = [(X[i : i + 100], Y[i : i + 100]) for i in range(0, 1600, 100)]
    kw = dict(hidden=32, epochs=15, lr=3e-3, progress=False, cosine_weight=0.5)
    m = MLP(**kw).fit_stream(batches, val=(Xv, Yv))
    assert m.score(Xv, Yv)["r2"] > 0.9
    # a callable and precomputed statistics give the same result as the list
    st = streamed(X[:1600], Y[:1600])
    m2 = MLP(**kw).fit_stream(lambda: iter(batches), val=(Xv, Yv), stats=st)
    assert torch.allclose(m.transform(Xv), m2.transform(Xv), atol=1e-5)
    # a one-shot generator: one pass, with checks every few steps
    with pytest.warns(UserWarning, match="one-shot"):
        m3 = MLP(hidden=16, epochs=3, val_every=4, progress=False).fit_stream(iter(batches), val=(Xv, Yv))
    assert max(h["epoch"] for h in m3.history_) == 1 and len(m3.history_) == 4
    with pytest.raises(TypeError, match="cannot be fit from statistics|no closed form"):
        MLP().fit_stats(st)


# -- save / load --------------------------------------------------------------------------------
ALL_KINDS = [
    lambda: Procrustes(scale=True),
    lambda: Affine(alpha="cv", standardize=True, winsorize=0.995),
    lambda: Affine(alpha=1.0, whiten=True, winsorize=(torch.full((6,), -3.0, dtype=F64), 3.0)),
    lambda: LowRank(rank=2, alpha=0.1),
    lambda: CCA(k=3),
    lambda: MLP(hidden=16, epochs=3, progress=False, standardize="y"),
    lambda: Adapter(steps=5),
    lambda: Adapter("mlp", hidden=8, init="procrustes", steps=5, objective="mse"),
]


@pytest.mark.parametrize("make", ALL_KINDS)
def test_save_load_round_trip_bit_exact(make, tmp_path):
    X = aniso(400, 6, seed=200).float()
    Y = (torch.tanh(X.double() @ randn(6, 4, seed=201)) + randn(400, 4, seed=202) * 0.1).float()
    m = (
        make()
        .fit(X, Y)
        .bind(
            a=model("org/llama-tiny", "aaa111"),
            b=model("org/mistral-tiny", "bbb222"),
            source="resid_post.3",
            target="resid_post.2",
            alignment="byte_chunks",
            positions={"skip_first": 1},
            bridge_mode="hf",
        )
    )
    path = m.save(tmp_path / "m.safetensors")
    m2 = load(path)
    assert type(m2) is type(m)
    for x in (X, X.double(), X[:7]):
        assert torch.equal(m.transform(x), m2.transform(x))
    assert m2.get_params().keys() == m.get_params().keys()
    assert m2.provenance == m.provenance
    assert m2.provenance["library_version"] == xlens_align.__version__
    assert m2.provenance["positions"] == {"skip_first": 1}
    tensors, scalars = m._state()
    tensors2, scalars2 = m2._state()
    assert scalars == scalars2
    assert tensors.keys() == tensors2.keys() and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    meta = xm.read_metadata(path)
    assert meta["kind"] == m.kind and meta["format_version"] == 1
    assert meta["library_version"] == xlens_align.__version__
    load(path, a=model("org/llama-tiny", "aaa111"), b=model("org/mistral-tiny", "bbb222"))


def test_load_refuses_mismatched_models(tmp_path):
    X, Y = aniso(100, 4, seed=210), randn(100, 3, seed=211)
    p = (
        Affine()
        .fit(X, Y)
        .bind(a=model("llama", "h1"), b=model("mistral", "h2"))
        .save(tmp_path / "m.safetensors")
    )
    with pytest.raises(
        ValueError, match=r"model A model_id='llama' config_hash='h1'.*a has model_id='gemma'"
    ):
        load(p, a=model("gemma", "h1"))
    with pytest.raises(ValueError, match=r"model B .*config_hash='h2'.*config_hash='other'"):
        load(p, a=model("llama", "h1"), b=model("mistral", "other"))
    q = Affine().fit(X, Y).save(tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="records no model A"):
        load(q, a=model("llama", "h1"))
    assert isinstance(load(q), Affine)


def test_load_refuses_bad_files(tmp_path):
    X, Y = aniso(100, 4, seed=220), randn(100, 3, seed=221)
    good = Affine().fit(X, Y).save(tmp_path / "m.safetensors")
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) - 40])
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        load(trunc)
    short = tmp_path / "short.safetensors"
    short.write_bytes(raw[:100])
    with pytest.raises(ValueError, match="truncated"):
        load(short)
    pickled = tmp_path / "pickle.safetensors"
    torch.save({"weight_": torch.zeros(3)}, pickled)
    with pytest.raises(ValueError, match="not a safetensors map file"):
        load(pickled)
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="pickle, not a safetensors map file"):
        load(legacy)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an xlens_align map file"):
        load(other)
    # unknown kind: rewrite the header's kind
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["kind"] = "no_such_kind"
    hb = json.dumps(header).encode()
    unknown = tmp_path / "unknown.safetensors"
    unknown.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    with pytest.raises(ValueError, match="unknown kind 'no_such_kind'"):
        load(unknown)
    # a header whose length starts with byte 0x80 (a pickle's first byte) is still a map file
    pad = (0x80 - (n + 2)) % 256 + 2
    hb = raw[8 : 8 + n] + b" " * pad
    odd = tmp_path / "odd_length.safetensors"
    odd.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])
    assert odd.read_bytes()[0] == 0x80
    assert torch.equal(load(odd).weight_, load(good).weight_)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(NotFittedError):
        Affine().save(tmp_path / "unfitted.safetensors")


# -- input errors -------------------------------------------------------------------------------
def test_bad_inputs_get_clear_errors():
    X, Y = aniso(50, 4, seed=230), randn(50, 3, seed=231)
    Xn = X.clone()
    Xn[5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^X contains 1 non-finite"):
        Affine().fit(Xn, Y)
    Yi = Y.clone()
    Yi[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^Y contains 1 non-finite"):
        Procrustes().fit(X, Yi)
    with pytest.raises(ValueError, match=r"^X contains"):
        MLP(progress=False).fit(Xn.float(), Y.float())
    with pytest.raises(ValueError, match="same number of rows"):
        Affine().fit(X, Y[:40])
    with pytest.raises(ValueError, match=r"X must have shape \[n, d\]"):
        Affine().fit(X[0], Y)
    with pytest.raises(TypeError, match="torch.Tensor"):
        Affine().fit(X.numpy(), Y)
    with pytest.raises(NotFittedError, match="not fitted"):
        Affine().transform(X)
    assert issubclass(NotFittedError, ValueError)
    m = Affine().fit(X, Y)
    with pytest.raises(ValueError, match="d_in=4"):
        m.transform(randn(3, 5, seed=1))
    with pytest.raises(ValueError, match=r"^X contains"):
        m.transform(Xn)
    with pytest.raises(ValueError, match="rank=9 exceeds"):
        LowRank(rank=9).fit(X, Y)
    with pytest.raises(ValueError, match="alpha must be"):
        Affine(alpha=-1.0).fit(X, Y)
    with pytest.raises(ValueError, match="whitening already standardizes"):
        Affine(standardize=True, whiten="x").fit(X, Y)


# -- base class: params, provenance, registry ---------------------------------------------------
def test_params_provenance_and_registry():
    m = Affine(alpha=0.5, standardize=True)
    assert m.get_params()["alpha"] == 0.5 and m.get_params()["standardize"] is True
    assert "Affine(alpha=0.5, standardize=True)" == repr(m)
    assert m.bind(source="resid_post.1", target="embed") is m
    assert m.provenance["source"] == "resid_post.1"
    with pytest.raises(TypeError, match="JSON"):
        m.bind(bad=object())
    with pytest.raises(TypeError, match="model_id"):
        m.bind(a=object())
    assert set(registry) >= {"procrustes", "affine", "low_rank", "cca", "mlp"}
    assert Affine.kind == "affine" and registry["mlp"] is MLP
    with pytest.raises(ValueError, match="already registered"):

        @register("affine")
        class Other(AlignmentMap):
            pass

    @register("test_scaled_identity")
    class ScaledIdentity(AlignmentMap):
        def __init__(self, factor: float = 2.0) -> None:
            self.factor = factor

        def _fit(self, X, Y):
            self.d_in_ = self.d_out_ = X.shape[1]
            self.factor_ = torch.full((X.shape[1],), float(self.factor), dtype=F64)

        def _predict64(self, X):
            return X.double() * self.factor_

    assert registry["test_scaled_identity"] is ScaledIdentity
    X = randn(10, 3, seed=240)
    s = ScaledIdentity(3.0).fit(X, X)
    assert torch.allclose(s.transform(X), 3 * X)
    with pytest.raises(TypeError, match="no closed form"):
        s.fit_stats(CrossStats.from_data(X, X))


# -- files from before the clamp -> winsorize rename ----------------------------------------------
def as_old_file(path: Path, out: Path) -> Path:
    """Rewrite a map file the way versions before the rename wrote it: hyper-parameter ``clamp``,
    tensors ``prep_x_.clamp_lo`` / ``clamp_hi`` (nested maps' params and tensors too)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k.replace(".winsor_", ".clamp_"): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for key in ("params", "state"):
        meta[key] = meta[key].replace('"winsorize"', '"clamp"').replace("winsor_lo", "clamp_lo")
    assert '"clamp"' in meta["params"]
    save_file(tensors, str(out), metadata=meta)
    return out


OLD_KINDS = [
    lambda: Affine(alpha=1.0, winsorize=(torch.full((6,), -1.0, dtype=F64), 1.5)),
    lambda: MLP(hidden=8, epochs=2, progress=False, winsorize=0.95),
    lambda: EmbeddingInjection("affine", {"winsorize": 0.9}),
]


@pytest.mark.parametrize("make", OLD_KINDS)
def test_old_files_with_clamp_load_as_winsorize(make, tmp_path):
    X = aniso(300, 6, seed=250).float()
    Y = (X.double() @ randn(6, 3, seed=251)).float()
    m = make().fit(X, Y)
    old = as_old_file(m.save(tmp_path / "new.safetensors"), tmp_path / "old.safetensors")
    with safe_open(str(old), framework="pt") as f:
        assert any(".clamp_lo" in k for k in f.keys()) and not any("winsor" in k for k in f.keys())  # noqa: SIM118
    m2 = load(old)
    assert "clamp" not in m2.get_params() and m2.get_params().keys() == m.get_params().keys()
    inner = m2.base_map_ if isinstance(m2, EmbeddingInjection) else m2
    assert inner.prep_x_.winsor_lo is not None
    assert torch.equal(m2.transform(X), m.transform(X))
    assert m2.clone().fit(X, Y).transform(X).shape == (300, 3)  # the renamed parameters refit as well


# -- the Adapter as an estimator ------------------------------------------------------------------
def planted_affine(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    X = (aniso(n, 10, seed=seed) * 3).float()
    Y = (X.double() @ randn(10, 6, seed=seed + 10) + 4 * randn(6, seed=seed + 11)).float()
    return X, Y + 0.01 * randn(n, 6, seed=seed + 12).float()


@pytest.mark.parametrize("base", ["affine", "mlp"])
def test_adapter_mse_recovers_planted_affine_map(base):
    X, Y = planted_affine(3000, seed=300)
    ad = Adapter(base, init=None, hidden=16, steps=600, lr=1e-2, patience=5).fit(X[:2400], Y[:2400])
    assert ad.init_ == "random" and ad.objective == "mse"
    assert ad.score(X[2400:], Y[2400:])["r2"] > 0.99
    assert ad.final_train_loss_ < 0.1 * ad.init_train_loss_
    assert ad.history_[0] == {
        "epoch": 0,
        "step": 0,
        "train_loss": ad.init_train_loss_,
        "val_loss": ad.init_val_loss_,
    }
    assert ad.best_val_loss_ <= ad.init_val_loss_ and ad.n_samples_ == 2400
    assert (ad.d_in_, ad.d_out_) == (10, 6) and next(ad.net_.parameters()).device == X.device
    # one validation check per pass over the training rows (batch_size 256, 90% of 2400 rows)
    assert ad.history_[1]["step"] == -(-2160 // 256)
    # deterministic, and the default init (a cross-validated Affine) already fits
    again = Adapter(base, init=None, hidden=16, steps=600, lr=1e-2, patience=5).fit(X[:2400], Y[:2400])
    assert again.history_ == ad.history_
    warm = Adapter(base, hidden=16, steps=1, lr=1e-9).fit(X[:2400], Y[:2400])
    assert warm.init_ == "affine" and warm.score(X[2400:], Y[2400:])["r2"] > 0.99


def toy_batches(X: torch.Tensor, Y: torch.Tensor, size: int) -> list[SimpleNamespace]:
    """Opaque batch objects as a pipeline would make them: `.x` plus whatever its loss needs."""
    return [SimpleNamespace(x=X[i : i + size], target=Y[i : i + size]) for i in range(0, X.shape[0], size)]


def test_adapter_trains_on_a_custom_loss_and_early_stops():
    X, Y = planted_affine(1200, seed=310)
    train, val = toy_batches(X[:1000], Y[:1000], 100), toy_batches(X[1000:], Y[1000:], 100)
    calls = {"grad": 0, "no_grad": 0}

    def loss(apply, batch):
        out = apply(batch.x)
        assert out.shape == batch.target.shape and out.dtype == torch.float32
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return (out - batch.target).abs().sum(), int(batch.x.shape[0])

    kw = dict(objective="kl", init=None, steps=2000, lr=3e-2, patience=2, min_delta=0.05, val_every=10)
    ad = Adapter(**kw).fit(X[:1000], Y[:1000], loss=loss, batches=train, val_batches=val)
    assert ad.stopped_early_ and ad.history_[-1]["step"] < 2000
    assert ad.best_step_ == max(h["step"] for h in ad.history_ if h["val_loss"] == ad.best_val_loss_)
    assert ad.best_val_loss_ < 0.2 * ad.init_val_loss_
    assert [h["step"] for h in ad.history_[:3]] == [0, 10, 20]
    assert all(h["val_loss"] is not None for h in ad.history_)
    assert calls["grad"] == ad.history_[-1]["step"] and calls["no_grad"] > 0
    assert ad.score(X[1000:], Y[1000:])["r2"] > 0.95
    # the same seed draws the same batches: identical runs
    again = Adapter(**kw).fit(X[:1000], Y[:1000], loss=loss, batches=train, val_batches=val)
    assert again.history_ == ad.history_
    # without val_batches every step runs, the last weights stay
    full = Adapter(**{**kw, "steps": 25}).fit(X[:1000], Y[:1000], loss=loss, batches=train)
    assert [h["step"] for h in full.history_] == [0, 10, 20, 25]
    assert full.best_val_loss_ is None and full.best_step_ == 25 and not full.stopped_early_
    assert all(h["val_loss"] is None for h in full.history_)
    with pytest.raises(FloatingPointError, match="step 1"):
        Adapter(objective="ce").fit(
            X, Y, loss=lambda apply, b: (apply(b.x).sum() * float("nan"), 1), batches=train
        )


def test_no_held_out_rows_runs_every_step():
    X, Y = planted_affine(300, seed=315)
    ad = Adapter(steps=7, batch_size=64, val_fraction=0.0).fit(X, Y)
    assert [h["step"] for h in ad.history_] == [0, 5, 7] and ad.best_step_ == 7
    assert ad.init_val_loss_ is None and ad.best_val_loss_ is None and not ad.stopped_early_
    m = MLP(hidden=8, epochs=3, batch_size=100, val_fraction=0.0, progress=False).fit(X, Y)
    assert [h["step"] for h in m.history_] == [3, 6, 9] and all(h["val_loss"] is None for h in m.history_)
    assert m.best_val_loss_ is None and m.best_epoch_ == 3 and m.n_samples_ == 300


def test_adapter_argument_errors():
    X, Y = planted_affine(200, seed=320)
    batches = toy_batches(X, Y, 50)
    with pytest.raises(TypeError, match=r"objective='mse'.*loss, batches must be None"):
        Adapter().fit(X, Y, loss=lambda a, b: (a(b.x).sum(), 1), batches=batches)
    with pytest.raises(TypeError, match=r"needs loss and batches.*xlens_align\.fitting\.train_adapter"):
        Adapter(objective="ce").fit(X, Y)
    with pytest.raises(TypeError, match="needs batches"):
        Adapter(objective="ce").fit(X, Y, loss=lambda a, b: (a(b.x).sum(), 1))
    with pytest.raises(TypeError, match="non-empty list"):
        Adapter(objective="ce").fit(X, Y, loss=lambda a, b: (a(b.x).sum(), 1), batches=[])
    with pytest.raises(TypeError, match=r"batches\[1\]\.x must be a tensor"):
        Adapter(objective="ce").fit(X, Y, loss=print, batches=[batches[0], SimpleNamespace(y=1)])
    with pytest.raises(ValueError, match=r"val_batches\[0\]\.x must be float32"):
        bad = [SimpleNamespace(x=X[:5].double())]
        Adapter(objective="ce").fit(X, Y, loss=print, batches=batches, val_batches=bad)
    with pytest.raises(TypeError, match=r"loss must return \(total: scalar Tensor, count: int\)"):
        Adapter(objective="ce", init=None).fit(X, Y, loss=lambda a, b: a(b.x), batches=batches)
    with pytest.raises(ValueError, match="base must be one of"):
        Adapter("linear").fit(X, Y)
    with pytest.raises(ValueError, match="objective must be one of"):
        Adapter(objective="nll").fit(X, Y)
    with pytest.raises(ValueError, match="init must be None, 'affine', 'procrustes'"):
        Adapter(init="cca").fit(X, Y)
    with pytest.raises(TypeError, match="base='mlp'"):
        Adapter(init=MLP(hidden=8, epochs=1, progress=False).fit(X, Y)).fit(X, Y)
    with pytest.raises(ValueError, match="val_fraction"):
        Adapter(val_fraction=1.5).fit(X, Y)
    assert "arch" not in Adapter().get_params() and Adapter("mlp").base == "mlp"


def test_adapter_starts_from_fitted_maps(tmp_path):
    X, Y = planted_affine(600, seed=330)
    m = Affine(alpha=0.1, winsorize=0.999).fit(X, Y)
    still = Adapter(init=m, steps=1, lr=1e-12).fit(X, Y)
    assert still.init_ == "map:affine" and still.prep_x_.winsor_lo is not None
    torch.testing.assert_close(still.transform(X), m.transform(X), rtol=1e-4, atol=1e-4)
    more = Adapter(init=still, steps=1, lr=1e-12).fit(X, Y)
    assert more.init_ == "adapter" and more.init_train_loss_ == pytest.approx(
        still.final_train_loss_, rel=1e-5
    )
    net = MLP(hidden=8, epochs=2, progress=False).fit(X, Y)
    from_net = Adapter("mlp", hidden=8, init=net, steps=1, lr=1e-12).fit(X, Y)
    assert from_net.init_ == "mlp"
    torch.testing.assert_close(from_net.transform(X), net.transform(X), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="other dimensions or architecture"):
        Adapter("mlp", hidden=4, init=net).fit(X, Y)
    # a map given as init is not saved with the adapter: a reloaded one says so when refit
    with pytest.raises(ValueError, match="set_params"):
        xm.load(still.save(tmp_path / "a.safetensors")).fit(X, Y)


# -- the one training loop --------------------------------------------------------------------------
def test_mlp_and_adapter_train_through_the_one_loop(monkeypatch):
    seen = []
    real = training.train

    def spy(*args, **kwargs):
        seen.append(kwargs["desc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    X, Y = planted_affine(300, seed=340)
    MLP(hidden=8, epochs=2, progress=False).fit(X, Y)
    Adapter(steps=3).fit(X, Y)
    Adapter(objective="ce", steps=3).fit(
        X, Y, loss=lambda a, b: (a(b.x).square().sum(), 1), batches=toy_batches(X, Y, 100)
    )
    assert seen == ["MLP", "adapter", "adapter"]
    monkeypatch.undo()
    with pytest.raises(FloatingPointError, match=r"MLP: the training loss is (inf|nan) at step \d+"):
        MLP(hidden=8, epochs=2, lr=1e30, progress=False).fit(X, Y)


def test_training_loop_schedule_and_best_state():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1, bias=False)
    X = randn(40, 3, seed=350, dtype=torch.float32)
    Y = X @ torch.tensor([[1.0], [-2.0], [0.5]])
    epochs = training.row_batches(X, Y, 4, seed=1)  # 10 batches per epoch
    run = training.train(net, training.row_mse(net), epochs, training.chunks(X, Y, 16), max_steps=25, lr=0.05)
    assert [h["step"] for h in run.history] == [10, 20, 25] and [h["epoch"] for h in run.history] == [1, 2, 3]
    assert run.best_val_loss == min(h["val_loss"] for h in run.history)
    assert training.evaluate(net, training.row_mse(net), training.chunks(X, Y)) == pytest.approx(
        run.best_val_loss
    )
    assert not net.training
    # a stream that runs dry ends training; checks every 3 steps plus the last one
    net2 = torch.nn.Linear(3, 1)
    run2 = training.train(
        net2,
        training.row_mse(net2),
        lambda e: training.chunks(X, Y, 8) if e == 1 else [],
        max_epochs=9,
        val_every=3,
    )
    assert [h["step"] for h in run2.history] == [3, 5] and run2.steps == 5 and run2.best_val_loss is None
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        training.train(net2, training.row_mse(net2), epochs)


# -- module structure ---------------------------------------------------------------------------------
def test_maps_io_and_base_import_each_way_without_cycles():
    for order in ("xlens_align.maps.io, xlens_align.maps.base", "xlens_align.maps.base, xlens_align.maps.io"):
        done = subprocess.run([sys.executable, "-c", f"import {order}"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    # the import graph inside maps/ (function-level imports included) has no cycle
    root = Path(xm.__file__).parent
    graph = {}
    for f in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("xlens_align.maps")
            ):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                deps |= {
                    n.rsplit(".", 1)[-1] for n in names if (root / f"{n.rsplit('.', 1)[-1]}.py").exists()
                }
        graph[f.stem] = deps - {f.stem}
    assert "base" not in graph["io"] and "io" in graph["base"]
    del graph["__init__"]
    for stem in graph:
        graph[stem].discard("__init__")

    def reaches(start, goal, seen=()):
        return any(
            d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph.get(start, ())
        )

    assert not [m for m in graph if reaches(m, m)], graph
