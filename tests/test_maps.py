"""Alignment maps: closed forms against direct solves, stats vs tensors, MLP, save/load, errors."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import xlens_align
import xlens_align.maps as xm
from xlens_align.maps import (
    CCA,
    MLP,
    Affine,
    AlignmentMap,
    LowRank,
    NotFittedError,
    Procrustes,
    load,
    register,
    registry,
    split_indices,
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


def test_clamp_thresholds_from_training_quantiles():
    X = randn(1000, 4, seed=140)
    X[3, 1] = 1e4  # a massive activation
    Y = X @ randn(4, 2, seed=141)
    m = Affine(clamp=0.99).fit(X, Y)
    lo = torch.quantile(X, 0.01, dim=0)
    hi = torch.quantile(X, 0.99, dim=0)
    assert torch.allclose(m.prep_x_.clamp_lo, lo) and torch.allclose(m.prep_x_.clamp_hi, hi)
    Xt = randn(10, 4, seed=142) * 50
    assert torch.equal(m.transform(Xt), m.transform(torch.maximum(torch.minimum(Xt, hi), lo)))
    with pytest.raises(ValueError, match="quantiles of the training rows"):
        Affine(clamp=0.99).fit_stats(CrossStats.from_data(X, Y))
    # precomputed thresholds work with statistics of clamped data
    Xc = X.clamp(-2.0, 2.0)
    a = Affine(clamp=(-2.0, 2.0)).fit_stats(streamed(Xc, Y))
    assert torch.allclose(a.weight_, Affine(clamp=(-2.0, 2.0)).fit(X, Y).weight_, atol=1e-8)


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
    lambda: Affine(alpha="cv", standardize=True, clamp=0.995),
    lambda: Affine(alpha=1.0, whiten=True, clamp=(torch.full((6,), -3.0, dtype=F64), 3.0)),
    lambda: LowRank(rank=2, alpha=0.1),
    lambda: CCA(k=3),
    lambda: MLP(hidden=16, epochs=3, progress=False, standardize="y"),
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
    with pytest.raises(ValueError, match="corrupted or truncated"):
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
