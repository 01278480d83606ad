"""Tests of xlens_align.similarity: measures, streaming, controls, grids."""

from __future__ import annotations

import json
import math
import sys
import types
import warnings

import pytest
import torch

from xlens_align import similarity as S
from xlens_align.similarity.cka import _cka_from_grams, _linear_cka_features
from xlens_align.stats import CrossStats, StatsGrid

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rotation(d: int, seed: int = 1) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def related(n: int = 400, dx: int = 24, dy: int = 32, noise: float = 1.0, seed: int = 0):
    g = gen(seed)
    z = torch.randn(n, 6, generator=g)
    x = z @ torch.randn(6, dx, generator=g) + noise * torch.randn(n, dx, generator=g)
    y = z @ torch.randn(6, dy, generator=g) + noise * torch.randn(n, dy, generator=g)
    return x, y


def cka_reference(x, y, kernel: str, debiased: bool) -> float:
    """CKA written out in numpy (Kornblith et al. 2019; debiased: Song et al. 2012's unbiased HSIC):
    linear Grams or RBF with bandwidth the median pairwise distance."""
    import numpy as np

    def gram(a):
        a = a.numpy().astype(np.float64)
        a = a - a.mean(0)
        if kernel == "linear":
            return a @ a.T
        d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        bw = np.median(np.sqrt(d2[np.triu_indices(len(a), 1)]))
        return np.exp(-d2 / (2 * bw**2))

    def hsic(k, l_):
        n = len(k)
        if not debiased:
            h = np.eye(n) - 1.0 / n
            return np.trace(k @ h @ l_ @ h) / (n - 1) ** 2
        k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
        one = np.ones(n)
        return (np.trace(k @ l_) + one @ k @ one * (one @ l_ @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * one @ k @ l_ @ one) / (n * (n - 3))  # fmt: skip

    k, l_ = gram(x), gram(y)
    return float(hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_)))


# -- CKA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [True, False])
def test_cka_self_one_and_invariances(kernel, debiased):
    x, y = related(160, 20, 20)
    x = x.double()  # transforms below in float64: float32 rounding would move CKA by ~1e-9
    assert S.cka(x, x, kernel=kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    base = S.cka(x, y, kernel=kernel, debiased=debiased)
    assert base == pytest.approx(cka_reference(x, y, kernel, debiased), abs=1e-10)
    assert 0.2 < base < 0.99  # neither trivially 0 nor 1: the invariances below mean something
    q = rotation(20)
    for xt in (x @ q, 3.7 * x, -x + 5.0):  # orthogonal, isotropic scaling, reflection + shift
        assert S.cka(xt, y, kernel=kernel, debiased=debiased) == pytest.approx(base, abs=1e-10)
    # an anisotropic scaling is *not* an invariance of CKA: the test can fail
    xs = x * torch.linspace(0.1, 3.0, 20)
    assert abs(S.cka(xs, y, kernel=kernel, debiased=debiased) - base) > 1e-3


def test_debiased_cka_of_independent_data_is_near_zero():
    g = gen(3)
    x, y = torch.randn(2000, 256, generator=g), torch.randn(2000, 256, generator=g)
    deb, bias = S.cka(x, y), S.cka(x, y, debiased=False)
    assert abs(deb) < 0.05
    # biased CKA of independent isotropic data is about d / (n + d) = 0.113 here
    assert bias > 0.08 and bias > 20 * abs(deb)
    x, y = torch.randn(256, 2048, generator=g), torch.randn(256, 2048, generator=g)
    with pytest.warns(S.SmallSampleWarning, match="n=256"):
        bias = S.cka(x, y, debiased=False)
    assert bias > 0.8 and abs(S.cka(x, y)) < 0.05


@pytest.mark.parametrize("debiased", [True, False])
def test_linear_cka_feature_and_gram_routes_agree(debiased):
    x, y = related(120, 30, 50)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    a = _linear_cka_features(xc, yc, debiased)
    b = _cka_from_grams(xc @ xc.T, yc @ yc.T, debiased)
    assert float(a) == pytest.approx(float(b), abs=1e-12)


def test_unbiased_hsic_equals_u_centred_inner_product_and_is_shift_invariant():
    x, y = related(50, 7, 9)
    k, l_ = S.gram_linear(x), S.gram_linear(y)
    h = S.hsic_unbiased(k, l_)
    assert h == pytest.approx(float((S.u_center(k) * S.u_center(l_)).sum()) / (50 * 47), rel=1e-12)
    raw_k, raw_l = x.double() @ x.double().T, (y.double() + 3) @ (y.double() + 3).T
    assert S.hsic_unbiased(raw_k, raw_l) == pytest.approx(h, rel=1e-9)
    kb = S.hsic_biased(k, l_)
    assert kb == pytest.approx(float(torch.trace(k @ l_)) / 49**2, rel=1e-10)  # k, l_ already centred


def test_biased_cka_closed_form_orthogonal_blocks():
    # X = [alpha A, beta B] with A, B orthonormal, centred, mutually orthogonal columns; Y = A:
    # CKA = alpha^2 sqrt(ka) / sqrt(alpha^4 ka + beta^4 kb)
    n, ka, kb, alpha, beta = 200, 5, 8, 2.0, 3.0
    m = torch.randn(n, ka + kb, generator=gen(5), dtype=F64)
    q, _ = torch.linalg.qr(m - m.mean(0))
    a, b = q[:, :ka], q[:, ka:]
    x = torch.cat([alpha * a, beta * b], 1)
    want = alpha**2 * math.sqrt(ka) / math.sqrt(alpha**4 * ka + beta**4 * kb)
    assert S.cka(x, a, debiased=False) == pytest.approx(want, abs=1e-12)


def test_rbf_sigma_multiplier_changes_value():
    x, y = related(200, 10, 12)
    v1, v2 = S.cka(x, y, kernel="rbf"), S.cka(x, y, kernel="rbf", sigma=0.3)
    assert abs(v1 - v2) > 1e-3
    assert S.cka(x, y, kernel="rbf", sigma=1.0) == pytest.approx(v1, abs=1e-14)


# -- CCA family, Procrustes, kNN, RSA ---------------------------------------------------------
def test_cca_family_rotation_gives_one():
    x = torch.randn(500, 40, generator=gen(7))
    xr = x.double() @ rotation(40)
    assert S.cca_corr(x, xr) == pytest.approx(1.0, abs=1e-6)
    assert S.svcca(x, xr) == pytest.approx(1.0, abs=1e-6)
    assert S.pwcca(x, xr) == pytest.approx(1.0, abs=1e-6)
    _, y = related(500, 40, 40, seed=9)
    for f in (S.cca_corr, S.svcca, S.pwcca):
        assert f(x, y) < 0.5
    # the mean canonical correlation written out: singular values of Sxx^-1/2 Sxy Syy^-1/2
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)

    def inv_sqrt(c):
        w, v = torch.linalg.eigh(c)
        return v @ torch.diag(w**-0.5) @ v.T

    rho = torch.linalg.svdvals(inv_sqrt(xc.T @ xc) @ (xc.T @ yc) @ inv_sqrt(yc.T @ yc))
    assert S.cca_corr(x, y) == pytest.approx(float(rho.mean()), abs=1e-9)


def test_cca_closed_form_shared_directions():
    # X = [A, B], Y = [A, C], columns of A, B, C orthonormal and centred: rho = (1, 1, 1, 0, 0)
    m = torch.randn(300, 10, generator=gen(11), dtype=F64)
    q, _ = torch.linalg.qr(m - m.mean(0))
    x, y = torch.cat([q[:, :3], q[:, 7:9]], 1), torch.cat([q[:, :3], q[:, 5:7]], 1)
    rho = S.canonical_correlations(x, y)
    assert torch.allclose(rho, torch.tensor([1, 1, 1, 0, 0], dtype=F64), atol=1e-12)
    assert S.cca_corr(x, y) == pytest.approx(0.6, abs=1e-12)


def test_cca_warns_when_trivially_one():
    x, y = torch.randn(30, 20, generator=gen(1)), torch.randn(30, 20, generator=gen(2))
    with pytest.warns(S.SmallSampleWarning, match="canonical"):
        S.cca_corr(x, y)


def test_svcca_keep_truncates():
    g = gen(4)
    x = torch.randn(400, 30, generator=g) * torch.logspace(0, -3, 30)
    y = torch.randn(400, 30, generator=g)
    assert S.svcca(x, y, keep=0.5) != pytest.approx(S.svcca(x, y, keep=1.0), abs=1e-4)


def _whitened_cca(xc: torch.Tensor, yc: torch.Tensor):
    """CCA written out on centred full-rank inputs: singular vectors and values of
    Sxx^-1/2 Sxy Syy^-1/2, and X's whitening matrix."""

    def inv_sqrt(c):
        w, v = torch.linalg.eigh(c)
        return v @ torch.diag(w**-0.5) @ v.T

    wx = inv_sqrt(xc.T @ xc)
    u, rho, _ = torch.linalg.svd(wx @ (xc.T @ yc) @ inv_sqrt(yc.T @ yc), full_matrices=False)
    return u, rho, wx


def test_pwcca_against_morcos_formula_written_out():
    # Morcos et al. 2018: rho_i weighted by alpha_i = sum_j |<h_i, x_j>|, h_i = X's canonical
    # variates (unit columns of Xc Sxx^-1/2 u_i), x_j = X's centred columns (their scale matters)
    g = gen(21)
    z = torch.randn(300, 3, generator=g, dtype=F64)
    x = z @ torch.randn(3, 6, generator=g, dtype=F64) * torch.tensor([5.0, 1, 1, 0.2, 3, 1], dtype=F64)
    x = x + 0.7 * torch.randn(300, 6, generator=g, dtype=F64)
    y = z @ torch.randn(3, 4, generator=g, dtype=F64) + torch.randn(300, 4, generator=g, dtype=F64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    u, rho, wx = _whitened_cca(xc, yc)
    h = xc @ wx @ u  # [n, 4] canonical variates of X, orthonormal columns
    assert torch.allclose(h.T @ h, torch.eye(4, dtype=F64), atol=1e-9)
    alpha = (h.T @ xc).abs().sum(1)
    ref = float((alpha / alpha.sum() * rho).sum())
    assert S.pwcca(x, y) == pytest.approx(ref, abs=1e-9)
    assert abs(ref - float(rho.mean())) > 0.02  # the weights matter here: not the plain mean


@pytest.mark.parametrize(("keep", "k"), [(0.6, 2), (0.9, 3), (0.97, 4), (1.0, 5)])
def test_svcca_keeps_the_directions_that_explain_keep(keep, k):
    # X's centred variance per direction: 50, 30, 15, 4, 1 % (cumulative .5 .8 .95 .99 1)
    g = gen(22)
    q, _ = torch.linalg.qr(torch.randn(400, 5, generator=g, dtype=F64))
    q = q - q.mean(0)
    q, _ = torch.linalg.qr(q)
    x = (q * torch.tensor([50.0, 30, 15, 4, 1], dtype=F64).sqrt()) @ rotation(5, seed=3)
    y = x @ torch.randn(5, 5, generator=g, dtype=F64) + 2.0 * torch.randn(400, 5, generator=g, dtype=F64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    ux, sx, _ = torch.linalg.svd(xc, full_matrices=False)
    assert torch.allclose(
        sx.square() / sx.square().sum(), torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01], dtype=F64)
    )
    uy, sy, _ = torch.linalg.svd(yc, full_matrices=False)
    frac = torch.cumsum(sy.square(), 0) / sy.square().sum()
    ky = int((frac < keep - 1e-12).sum()) + 1
    _, rho, _ = _whitened_cca(ux[:, :k] * sx[:k], uy[:, :ky] * sy[:ky])
    assert S.svcca(x, y, keep=keep) == pytest.approx(float(rho.mean()), abs=1e-9)


def test_bootstrap_interval_has_the_requested_level():
    # the bootstrap distribution of a mean of n values is about N(mean, s^2 / n): the percentile
    # interval at `level` spans 2 z s / sqrt(n), z the normal quantile (1.645 at 90%, 1.282 at 80%)
    x = torch.randn(400, 2, generator=gen(23), dtype=F64)
    se = float(x[:, 0].std() / math.sqrt(400))
    for level, z in ((0.9, 1.6449), (0.8, 1.2816), (0.5, 0.6745)):
        lo, hi = S.bootstrap_ci(lambda a, b: float(a[:, 0].mean()), x, x, n_boot=3000, level=level, seed=4)
        assert hi - lo == pytest.approx(2 * z * se, rel=0.08), level
        assert (lo + hi) / 2 == pytest.approx(float(x[:, 0].mean()), abs=0.15 * se)


def test_procrustes_distance():
    x = torch.randn(200, 16, generator=gen(2))
    q = rotation(16, 3)
    assert S.procrustes_distance(x, 4.0 * (x.double() @ q) + 2.0) == pytest.approx(0.0, abs=1e-6)
    wide = torch.randn(20, 64, generator=gen(2))  # n < d route
    assert S.procrustes_distance(wide, wide.double() @ rotation(64, 5)) == pytest.approx(0.0, abs=1e-6)
    m = torch.randn(100, 6, generator=gen(8), dtype=F64)
    q2, _ = torch.linalg.qr(m - m.mean(0))
    assert S.procrustes_distance(q2[:, :3], q2[:, 3:]) == pytest.approx(math.sqrt(2), abs=1e-12)
    _, y = related(200, 16, 16)
    assert 0.5 < S.procrustes_distance(x, y) < math.sqrt(2)


def test_mutual_knn():
    x = torch.randn(300, 12, generator=gen(5))
    assert S.mutual_knn(x, x) == 1.0
    assert S.mutual_knn(x, x.double() @ rotation(12)) == pytest.approx(1.0)
    y = torch.randn(300, 12, generator=gen(6))
    assert S.mutual_knn(x, y, k=10) < 0.1  # chance is k / (n - 1) = 0.033
    # planted 1-D example, euclidean, k=1: neighbours of [0, 1, 10, 12] are (1, 0, 3, 2),
    # of [0, 5, 6, 20] are (1, 2, 1, 2): items 0, 3 agree -> 0.5
    a = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    b = torch.tensor([[0.0], [5.0], [6.0], [20.0]])
    assert S.knn_indices(a, 1, "euclidean").flatten().tolist() == [1, 0, 3, 2]
    assert S.mutual_knn(a, b, k=1, metric="euclidean") == 0.5


def test_rankdata_and_spearman_ties():
    v = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0])
    assert S.rankdata(v).tolist() == [4.0, 1.5, 5.0, 1.5, 6.5, 9.0, 3.0, 8.0, 6.5]
    u = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert S.spearman(u, u**3) == pytest.approx(1.0)
    assert S.spearman(u, -u) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) vs (1.5, 1.5, 3, 4); centred (-1.5, -0.5, 0.5, 1.5) . (-1, -1, 0.5, 1.5)
    # = 4.5, norms^2 5 and 4.5: rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([7.0, 7.0, 8.0, 9.0])
    assert S.spearman(a, b) == pytest.approx(math.sqrt(0.9), abs=1e-15)


def test_rsa():
    x = torch.randn(80, 10, generator=gen(6))
    assert S.rsa(x, 2.0 * (x.double() @ rotation(10)) + 1.0, metric="euclidean") == pytest.approx(
        1.0, abs=1e-9
    )
    scale = torch.rand(80, 1, generator=gen(7)) + 0.5
    shift = torch.randn(80, 1, generator=gen(8))
    assert S.rsa(x, x * scale + shift, metric="correlation") == pytest.approx(1.0, abs=1e-9)
    y = torch.randn(80, 10, generator=gen(9))
    assert abs(S.rsa(x, y)) < 0.15
    # RDM layout: upper triangle row-major
    r = S.rdm(torch.tensor([[0.0], [1.0], [3.0]]), metric="euclidean")
    assert r.tolist() == pytest.approx([1.0, 3.0, 2.0])


# -- edge cases -------------------------------------------------------------------------------
MEASURE_FUNCS = {
    "cka": S.cka,
    "cka_biased": lambda x, y: S.cka(x, y, debiased=False),
    "cka_rbf": lambda x, y: S.cka(x, y, kernel="rbf"),
    "cca_corr": S.cca_corr,
    "svcca": S.svcca,
    "pwcca": S.pwcca,
    "procrustes_distance": S.procrustes_distance,
    "mutual_knn": lambda x, y: S.mutual_knn(x, y, k=3),
    "rsa": S.rsa,
}


@pytest.mark.parametrize("name", list(MEASURE_FUNCS))
def test_zero_variance_gives_documented_value(name):
    f = MEASURE_FUNCS[name]
    x = torch.randn(30, 5, generator=gen(1))
    const = torch.full((30, 5), 0.1).add_(torch.arange(5.0))  # constant across rows
    want = math.sqrt(2) if name == "procrustes_distance" else 0.0
    for a, b in ((x, const), (const, x)):
        with pytest.warns(S.DegenerateInputWarning, match="zero variance"):
            assert f(a, b) == want


@pytest.mark.parametrize("name", list(MEASURE_FUNCS))
def test_bad_input_raises(name):
    f = MEASURE_FUNCS[name]
    x = torch.randn(30, 5, generator=gen(1))
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^Y contains 1 non-finite"):
        f(x, bad)
    inf = x.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^X contains"):
        f(inf, x)
    with pytest.raises(ValueError, match="same number of rows"):
        f(x, x[:-1])
    with pytest.raises(ValueError, match=r"^Y must have shape \[n, d\]"):
        f(x, x[None])
    with pytest.raises(ValueError, match=r"^X must have shape \[n, d\]"):
        f(x[:, 0], x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        f(x.numpy(), x)


def test_small_n_and_option_errors():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="at least 4 rows"):
        S.cka(x, x)
    assert S.cka(x, x, debiased=False) == pytest.approx(1.0)
    y = torch.randn(10, 4)
    with pytest.raises(ValueError, match="kernel"):
        S.cka(y, y, kernel="poly")
    with pytest.raises(ValueError, match="sigma only applies"):
        S.cka(y, y, sigma=2.0)
    with pytest.raises(ValueError, match="sigma"):
        S.cka(y, y, kernel="rbf", sigma=-1.0)
    with pytest.raises(ValueError, match="k must be < n - 1"):
        S.mutual_knn(y, y, k=9)
    with pytest.raises(ValueError, match="keep"):
        S.svcca(y, y, keep=1.5)
    with pytest.raises(ValueError, match="metric"):
        S.rsa(y, y, metric="cosine")
    with pytest.raises(ValueError, match="constant across features"):
        S.rsa(torch.ones(5, 3).cumsum(0), y[:5])
    with pytest.raises(ValueError, match="X needs at least one column"):
        S.cka(torch.zeros(10, 0), y)


def test_biased_warns_only_when_n_below_d():
    x = torch.randn(20, 50, generator=gen(1))
    with pytest.warns(S.SmallSampleWarning):
        S.cka(x, x, debiased=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.cka(x, x)
        S.cka(x[:, :10], x[:, :10], debiased=False)


# -- streaming --------------------------------------------------------------------------------
def _stacks(n=600, seed=0):
    g = gen(seed)
    z = torch.randn(n, 8, generator=g)
    a = {
        f"a{i}": z @ torch.randn(8, 10 + 3 * i, generator=g) + 0.7 * torch.randn(n, 10 + 3 * i, generator=g)
        for i in range(3)
    }
    b = {
        f"b{i}": z @ torch.randn(8, 14, generator=g) + (0.3 + i) * torch.randn(n, 14, generator=g)
        for i in range(4)
    }
    return a, b


def _minibatch_ref(xa, xb, bounds):
    """Row-weighted mean of Song's HSIC_1 per minibatch, computed from the definition."""
    num = aa = bb = 0.0
    for s, e in bounds:
        k, l_ = S.gram_linear(xa[s:e]), S.gram_linear(xb[s:e])
        w = e - s
        num += w * S.hsic_unbiased(k, l_)
        aa += w * S.hsic_unbiased(k, k)
        bb += w * S.hsic_unbiased(l_, l_)
    return num / math.sqrt(aa * bb)


@pytest.mark.parametrize("sizes", [[100] * 6, [100, 250, 50, 200]])
def test_minibatch_cka_equals_direct_average(sizes):
    a, b = _stacks()
    acc = S.MinibatchCKA()
    bounds, s = [], 0
    for m in sizes:
        acc.update({k: v[s : s + m] for k, v in a.items()}, {k: v[s : s + m] for k, v in b.items()})
        bounds.append((s, s + m))
        s += m
    out = acc.compute()
    assert out.dtype == F64 and out.shape == (3, 4)
    for i, ka in enumerate(a):
        for j, kb in enumerate(b):
            assert float(out[i, j]) == pytest.approx(_minibatch_ref(a[ka], b[kb], bounds), abs=1e-10)
    # a single minibatch of everything is the full-batch debiased CKA
    one = S.MinibatchCKA().update(a, b).compute()
    assert float(one[1, 2]) == pytest.approx(S.cka(a["a1"], b["b2"]), abs=1e-10)


def test_minibatch_rechunking_bounded_state():
    a, b = _stacks()
    acc = S.MinibatchCKA(["a0", "a2"], ["b1", "b3"], minibatch_size=128)
    s = 0
    for m in [37, 90, 5, 200, 111, 157]:  # 600 rows -> 4 minibatches of 128 + 88 pending
        acc.update({k: v[s : s + m] for k, v in a.items()}, {k: v[s : s + m] for k, v in b.items()})
        s += m
        assert acc.pending_rows < 128
    assert acc.n_minibatches == 4 and acc.pending_rows == 88
    bounds = [(0, 128), (128, 256), (256, 384), (384, 512), (512, 600)]
    out = acc.compute()
    assert float(out[1, 0]) == pytest.approx(_minibatch_ref(a["a2"], b["b1"], bounds), abs=1e-10)
    assert acc.pending_rows == 88  # compute did not consume the pending rows
    # state is a handful of [P_A, P_B] / [P] sums, whatever the number of tokens
    assert acc._sum_ab.shape == (2, 2) and acc._sum_aa.shape == (2,)


def test_minibatch_single_tensors_and_errors():
    x, y = related(200, 8, 9)
    acc = S.MinibatchCKA()
    acc.update(x[:100], y[:100]).update(x[100:], y[100:])
    assert acc.compute().shape == (1, 1)
    with pytest.raises(ValueError, match="at least 4 rows"):
        S.MinibatchCKA().update(x[:3], y[:3])
    with pytest.raises(ValueError, match="no minibatch"):
        S.MinibatchCKA().compute()
    with pytest.raises(ValueError, match="lacks points"):
        S.MinibatchCKA(["p"], ["q"]).update({"r": x}, {"q": y})
    bad = y.clone()
    bad[5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"acts_b\['q'\] contains"):
        S.MinibatchCKA().update({"p": x}, {"q": bad})
    with pytest.raises(ValueError, match="same number of rows"):
        S.MinibatchCKA().update({"p": x}, {"q": y[:-1]})
    acc = S.MinibatchCKA().update({"p": x}, {"q": y})
    with pytest.raises(ValueError, match="features"):
        acc.update({"p": x[:, :4]}, {"q": y})
    with pytest.warns(S.DegenerateInputWarning):
        out = S.MinibatchCKA().update({"p": x, "c": torch.ones(200, 3)}, {"q": y}).compute()
    assert float(out[1, 0]) == 0.0


def test_cka_from_stats_equals_direct():
    x, y = related(500, 12, 20)
    st = CrossStats.empty(12, 20)
    for s in range(0, 500, 70):
        st.update(x[s : s + 70], y[s : s + 70])
    assert S.cka_from_stats(st) == pytest.approx(S.cka(x, y, debiased=False), abs=1e-12)
    a, b = _stacks()
    grid = StatsGrid(list(a), list(b))
    for s in range(0, 600, 150):
        grid.update({k: v[s : s + 150] for k, v in a.items()}, {k: v[s : s + 150] for k, v in b.items()})
    vals = S.cka_grid_from_stats(grid)
    for i, ka in enumerate(a):
        for j, kb in enumerate(b):
            assert float(vals[i, j]) == pytest.approx(S.cka(a[ka], b[kb], debiased=False), abs=1e-12)
    part = StatsGrid(["a0", "a1"], ["b0"], pairs=[("a0", "b0")]).update(a, b)
    assert torch.isnan(S.cka_grid_from_stats(part)[1, 0])


# -- statistical controls ---------------------------------------------------------------------
def test_permutation_test_and_bootstrap():
    x, y = related(120, 8, 8, noise=0.5)
    p = S.permutation_test(S.cka, x, y, n_perm=49, seed=1)
    assert p == pytest.approx(1 / 50)
    xi = torch.randn(120, 8, generator=gen(11))
    p_null = S.permutation_test(S.cka, xi, y, n_perm=49, seed=1)
    assert p_null > 0.05
    assert S.permutation_test(S.cka, xi, y, n_perm=49, seed=1) == p_null  # seeded
    assert S.permutation_test(S.procrustes_distance, x, y, n_perm=19, alternative="less") == pytest.approx(
        1 / 20
    )
    lo, hi = S.bootstrap_ci(lambda a, b: S.cka(a, b, debiased=False), x, y, n_boot=60, level=0.9, seed=2)
    est = S.cka(x, y, debiased=False)
    assert lo < est < hi and hi - lo < 0.5
    with pytest.raises(ValueError, match="n_perm"):
        S.permutation_test(S.cka, x, y, n_perm=0)
    with pytest.raises(ValueError, match="level"):
        S.bootstrap_ci(S.cka, x, y, level=1.5)


# -- grids ------------------------------------------------------------------------------------
def _batches(a, b, size=150):
    n = next(iter(a.values())).shape[0]
    return [
        types.SimpleNamespace(
            a={k: v[s : s + size] for k, v in a.items()}, b={k: v[s : s + size] for k, v in b.items()}
        )
        for s in range(0, n, size)
    ]


ALL_ROW_MEASURES = {
    "cka_rbf": lambda x, y: S.cka(x, y, kernel="rbf"),
    "cca": S.cca_corr,
    "svcca": S.svcca,
    "pwcca": S.pwcca,
    "procrustes": S.procrustes_distance,
    "mutual_knn": S.mutual_knn,
    "rsa": S.rsa,
}


@pytest.mark.parametrize("measure", list(ALL_ROW_MEASURES))
def test_grid_all_row_measures_equal_pure_functions(measure):
    a, b = _stacks(160)
    g = S.grid_from_batches(_batches(a, b, 50), measure)
    assert g.n_tokens == 160 and g.values.shape == (3, 4) and g.measure == measure
    f = ALL_ROW_MEASURES[measure]
    for i, ka in enumerate(a):
        for j, kb in enumerate(b):
            assert float(g.values[i, j]) == pytest.approx(f(a[ka], b[kb]), abs=1e-10)


def test_grid_streamed_measures_equal_full_batch():
    a, b = _stacks(600)
    g = S.grid_from_batches(_batches(a, b), "cka_feature")
    assert float(g.values[2, 1]) == pytest.approx(S.cka(a["a2"], b["b1"], debiased=False), abs=1e-12)
    g = S.grid_from_batches(_batches(a, b, 100), "cka", minibatch_size=200)
    bounds = [(0, 200), (200, 400), (400, 600)]
    assert g.extra["n_minibatches"] == 3 and g.n_tokens == 600
    assert float(g.values[0, 3]) == pytest.approx(_minibatch_ref(a["a0"], b["b3"], bounds), abs=1e-10)
    g = S.grid_from_batches(_batches(a, b), lambda x, y: float(x.shape[1] * 100 + y.shape[1]))
    assert g.values[1, 0] == 1314


def test_grid_max_rows_and_subsample():
    a, b = _stacks(600)
    with pytest.raises(ValueError, match="max_rows=256"):
        S.grid_from_batches(_batches(a, b), "svcca", max_rows=256)
    assert S.grid_from_batches(_batches(a, b), "svcca", max_rows=None).n_tokens == 600
    tag = {"a0": torch.arange(600.0)[:, None].repeat(1, 3)}
    g = S.grid_from_batches(
        _batches(tag, {"b0": b["b0"]}, 50),
        lambda x, y: float(x[:, 0].mean()),
        max_rows=200,
        subsample=True,
    )
    assert g.n_tokens == 200 and g.extra["subsampled"] and g.extra["rows_seen"] == 600
    assert 200 < g.values[0, 0] < 400  # a uniform sample of 0..599 has mean ~300, the first 200 ~100
    seen = []

    def record(x, y):
        seen.append(x[:, 0].clone())
        return 0.0

    S.grid_from_batches(_batches(tag, {"b0": b["b0"]}, 50), record, max_rows=200, subsample=True)
    assert seen[0].unique().numel() == 200  # no row sampled twice


def _planted(n=300, every=50, factor=1000.0):
    """`_stacks` with massive-activation rows planted at point a1 (every `every`-th row)."""
    a, b = _stacks(n)
    a2 = {k: v.clone() for k, v in a.items()}
    a2["a1"][::every] *= factor
    keep = torch.ones(n, dtype=torch.bool)
    keep[::every] = False
    return a, a2, b, keep


def test_grid_massive_drops_exactly_the_planted_rows():
    a, a2, b, keep = _planted()  # 6 massive-activation rows
    g = S.grid_from_batches(_batches(a2, b), "cka_feature", massive=5.0)
    assert g.extra["filtered"] == {"massive": 6} and g.n_tokens == 294 and g.extra["rows_seen"] == 300
    assert float(g.values[1, 0]) == pytest.approx(
        S.cka(a["a1"][keep], b["b0"][keep], debiased=False), abs=1e-12
    )
    # the kept rows are exactly those of the store: the same for every measure
    g = S.grid_from_batches(
        _batches(a2, b, 300), lambda x, y: float(x[:, 0].sum()), massive=5.0, max_rows=None
    )
    assert float(g.values[0, 0]) == pytest.approx(float(a2["a0"][keep, 0].sum()), rel=1e-6)
    with pytest.warns(UserWarning, match=r"A:a1 .*massive=5\.0"):
        raw = S.grid_from_batches(_batches(a2, b), "cka_feature")
    assert raw.n_tokens == 300 and raw.extra["filtered"] == {}
    assert abs(float(raw.values[1, 0] - S.cka(a["a1"][keep], b["b0"][keep], debiased=False))) > 0.05


def test_grid_rows_match_rowfilter_activations():
    """massive= in a grid keeps, batch by batch, exactly the rows rows.RowFilter.activations keeps."""
    from xlens_align.rows import RowFilter

    _, a2, b, _ = _planted(300, every=37, factor=8.0)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["b2"][5] *= 30.0
    kept = []
    g = S.grid_from_batches(
        _batches(a2, b2, 100), lambda x, y: kept.append(x.clone()) or 0.0, ["a0"], ["b0"], massive=3.0
    )
    want = []
    for s in range(0, 300, 100):
        rf = RowFilter(massive=3.0)
        keep, counts = rf.activations([a2["a0"][s : s + 100], b2["b0"][s : s + 100]])
        want.append(a2["a0"][s : s + 100][keep])
    assert torch.equal(kept[0], torch.cat(want))
    # the massive test reads only the points of the grid: planted rows at a1 / b2 do not count here
    assert g.extra["filtered"] == {"massive": 0}
    g = S.grid_from_batches(_batches(a2, b2, 100), "cka_feature", massive=3.0)
    n_drop = 0
    for s in range(0, 300, 100):
        acts = [v[s : s + 100] for v in (*a2.values(), *b2.values())]
        n_drop += RowFilter(massive=3.0).activations(acts)[1]["massive"]
    assert g.extra["filtered"] == {"massive": n_drop} and n_drop >= 9 and g.n_tokens == 300 - n_drop


def test_grid_reports_filter_settings_and_counts():
    a, a2, b, _ = _planted()
    batches = [
        types.SimpleNamespace(a=x.a, b=x.b, filtered={"bos": 2, "drop_first": 3})
        for x in _batches(a2, b, 100)
    ]
    g = S.grid_from_batches(batches, "cka", massive=5.0, minibatch_size=100)
    assert g.extra["rows"] == {"bos": "excluded", "drop_first": 0, "massive": 5.0, "clamp": None}
    assert g.extra["filtered"] == {"bos": 6, "drop_first": 9, "massive": 6}
    back = S.Grid.from_json(g.to_json())
    assert back.extra["rows"] == g.extra["rows"] and back.extra["filtered"] == g.extra["filtered"]
    # clamp clips values, infinities included, and keeps every row; NaN still raises
    a3 = {k: v.clone() for k, v in a.items()}
    a3["a0"][7, 2] = float("inf")
    with pytest.raises(ValueError, match=r"batch\.a\['a0'\] contains 1 non-finite"):
        S.grid_from_batches(_batches(a3, b), "cka_feature")
    g = S.grid_from_batches(_batches(a3, b), lambda x, y: float(x.abs().max()), clamp=10.0)
    assert g.values[0, 0] == 10.0 and g.n_tokens == 300 and g.extra["rows"]["clamp"] == 10.0
    a3["a0"][8, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        S.grid_from_batches(_batches(a3, b), "cka_feature", clamp=10.0)
    with pytest.raises(ValueError, match="massive must be None or a factor > 1"):
        S.grid_from_batches(_batches(a, b), "cka", massive=0.5)
    with pytest.raises(ValueError, match="clamp must be a finite number > 0"):
        S.grid_from_batches(_batches(a, b), "cka", clamp=-1.0)
    empty = types.SimpleNamespace(
        a={"x": torch.ones(0, 2)}, b={"y": torch.ones(0, 2)}, filtered={"drop_first": 4}
    )
    with pytest.raises(ValueError, match=r"needs at least 2 aligned rows, got 0 of 4 \(drop_first removed 4"):
        S.grid_from_batches([empty], "cka_feature", massive=2.0)


def test_grid_bad_measure_and_source():
    a, b = _stacks(100)
    with pytest.raises(ValueError, match="unknown measure"):
        S.grid_from_batches(_batches(a, b), "cosine")
    with pytest.raises(TypeError, match="does not take"):
        S.grid_from_batches(_batches(a, b), "svcca", measure_kw={"k": 3})
    with pytest.raises(ValueError, match="no batches"):
        S.grid_from_batches([], "cka")
    with pytest.raises(ValueError, match="lacks points"):
        S.grid_from_batches(_batches(a, b), "cka", points_a=["zz"])


def test_grid_object():
    vals = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, float("nan")], [float("nan")] * 3], dtype=F64)
    g = S.Grid(
        vals, ["l0", "l1", "l2"], ["m0", "m1", "m2"], "cka", 1234, "llama", "mistral", {"p": [0.01, None]}
    )
    assert g.best_match() == {"l0": ("m1", 0.9), "l1": ("m0", 0.8)}
    d = S.Grid(vals, g.points_a, g.points_b, "procrustes", 10)
    assert d.best_match()["l0"] == ("m0", 0.1) and not d.higher_is_better
    back = S.Grid.from_json(g.to_json())
    assert torch.equal(torch.isnan(back.values), torch.isnan(g.values))
    assert torch.equal(back.values.nan_to_num(-1), g.values.nan_to_num(-1))
    assert (back.points_a, back.points_b, back.measure, back.n_tokens) == (
        g.points_a,
        g.points_b,
        "cka",
        1234,
    )
    assert (back.model_a, back.model_b, back.extra) == ("llama", "mistral", {"p": [0.01, None]})
    json.loads(g.to_json())  # strict JSON, no NaN literals
    with pytest.raises(ValueError, match="shape"):
        S.Grid(vals[:2], g.points_a, g.points_b, "cka", 1)


def test_grid_figure_and_html(tmp_path):
    vals = torch.rand(2, 3, generator=gen(0), dtype=F64)
    g = S.Grid(
        vals,
        ["resid_post.0", "resid_post.1"],
        ["embed", "resid_post.0", "final"],
        "svcca",
        999,
        "A-model",
        "B-model",
    )
    fig = g.figure()
    hm = fig.data[0]
    assert list(hm.x) == g.points_b and list(hm.y) == g.points_a
    assert fig.layout.xaxis.title.text == "B-model point" and fig.layout.yaxis.title.text == "A-model point"
    assert "svcca" in fig.layout.title.text and "999" in fig.layout.title.text
    assert "%{z" in hm.hovertemplate
    path = g.save_html(tmp_path / "grid.html")
    html = path.read_text()
    assert "resid_post.1" in html and "final" in html and "B-model" in html
    assert "cdn.plot.ly" not in html.split("<body>")[0]  # plotly.js is inlined


def test_layer_grid_with_collect_interface(monkeypatch):
    a, b = _stacks(300)
    calls = {}

    def fake_collect(pair, texts, points_a, points_b, batch_size, progress, **kw):
        calls.update(
            points_a=points_a, points_b=points_b, batch_size=batch_size, progress=progress, kw=kw, texts=texts
        )
        yield from _batches({p: a["a0"] for p in points_a}, {p: b["b1"] for p in points_b}, 100)

    monkeypatch.setitem(sys.modules, "xlens_align.activations", types.SimpleNamespace(collect=fake_collect))
    def point(name):  # the models' canonical names: these are already canonical
        return types.SimpleNamespace(name=name)

    model_a = types.SimpleNamespace(
        name="tiny-a", points=["embed", "resid_pre.0", "resid_post.0", "resid_post.1", "final"], point=point
    )
    model_b = types.SimpleNamespace(name="tiny-b", points=["embed", "resid_post.0"], point=point)
    pair = types.SimpleNamespace(a=model_a, b=model_b)
    g = S.layer_grid(
        pair,
        ["t1", "t2"],
        batch_size=4,
        progress=False,
        max_tokens=7,
        minibatch_size=100,
        drop_first=1,
        clamp=1e4,
    )
    assert calls["points_a"] == ["embed", "resid_post.0", "resid_post.1"] and calls["points_b"] == [
        "embed",
        "resid_post.0",
    ]
    assert calls["batch_size"] == 4 and calls["texts"] == ["t1", "t2"]
    assert calls["kw"] == {"max_tokens": 7, "drop_first": 1, "clamp": 1e4}  # massive is applied by the grid
    assert g.extra["rows"] == {"bos": "excluded", "drop_first": 1, "massive": None, "clamp": 1e4}
    assert (g.model_a, g.model_b, g.measure, g.n_tokens) == ("tiny-a", "tiny-b", "cka", 300)
    assert torch.allclose(g.values, torch.full((3, 2), float(g.values[0, 0]), dtype=F64))
    g2 = S.layer_grid(
        pair, None, "rsa", points_a=["x"], points_b=["y"], source=_batches({"x": a["a0"]}, {"y": b["b1"]})
    )
    assert g2.values.shape == (1, 1) and float(g2.values[0, 0]) == pytest.approx(
        S.rsa(a["a0"], b["b1"]), abs=1e-12
    )
    with pytest.raises(TypeError, match="bypasses collect"):
        S.layer_grid(pair, None, source=[], max_tokens=3)
    with pytest.raises(TypeError, match=r"bypasses collect.*drop_first"):
        S.layer_grid(pair, None, source=[], drop_first=1)


def test_grid_degenerate_point_is_named():
    a, b = _stacks(120)
    a["flat"] = torch.ones(120, 5)
    with pytest.warns(S.DegenerateInputWarning, match="A:flat"):
        g = S.grid_from_batches(_batches(a, b, 60), "svcca")
    assert (g.values[3] == 0).all() and (g.values[:3] > 0).all()
    with pytest.warns(S.DegenerateInputWarning, match="flat"):
        g = S.grid_from_batches(_batches(a, b, 60), "procrustes")
    assert torch.allclose(g.values[3], torch.full((4,), math.sqrt(2), dtype=F64))


def test_grid_controls_on_request():
    """Related pairs get small permutation p-values and intervals around the value; unrelated don't."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(600, 8, generator=g)
    a = {"a0": z @ torch.randn(8, 16, generator=g) + 0.1 * torch.randn(600, 16, generator=g)}
    b = {
        "related": z @ torch.randn(8, 12, generator=g) + 0.1 * torch.randn(600, 12, generator=g),
        "noise": torch.randn(600, 12, generator=g),
    }
    batches = [
        ({k: v[i : i + 100] for k, v in a.items()}, {k: v[i : i + 100] for k, v in b.items()})
        for i in range(0, 600, 100)
    ]
    grid = S.grid_from_batches(batches, "cka", n_perm=49, n_boot=40, control_rows=300, minibatch_size=100)
    ctl = grid.extra["controls"]
    assert ctl["rows"] == 300 and ctl["n_perm"] == 49 and ctl["alternative"] == "greater"
    p = grid.extra["p_values"][0]
    assert p[0] == pytest.approx(1 / 50)  # no shuffle reaches the related pair's CKA
    assert p[1] > 0.05
    lo, hi = grid.extra["ci_low"][0], grid.extra["ci_high"][0]
    related = S.cka(
        torch.cat([x["a0"] for x, _ in batches])[:300], torch.cat([y["related"] for _, y in batches])[:300]
    )
    assert lo[0] < hi[0] and lo[0] > 0.5 and hi[1] < 0.5
    assert 0.5 < related
    back = S.Grid.from_json(grid.to_json())
    assert back.extra["p_values"] == grid.extra["p_values"]
    # distances test the other tail
    dist = S.grid_from_batches(batches, "procrustes", n_perm=19, control_rows=200)
    assert dist.extra["controls"]["alternative"] == "less" and dist.extra["p_values"][0][0] == pytest.approx(
        1 / 20
    )
    with pytest.raises(ValueError, match="n_perm must be an int >= 0"):
        S.grid_from_batches(batches, "cka", n_perm=-1)


def test_grid_figure_shows_controls_on_hover():
    g = S.Grid(
        torch.tensor([[0.9, 0.1]]),
        ["a0"],
        ["b0", "b1"],
        "cka",
        100,
        extra={"p_values": [[0.01, 0.6]], "ci_low": [[0.8, -0.05]], "ci_high": [[0.95, 0.2]]},
    )
    trace = g.figure().data[0]
    assert "%{customdata}" in trace.hovertemplate
    assert trace.customdata[0][0] == "<br>p = 0.01<br>CI [0.800, 0.950]"
    assert (
        "customdata"
        not in S.Grid(torch.tensor([[0.5]]), ["a"], ["b"], "cka", 10).figure().data[0].hovertemplate
    )


def test_layer_grid_takes_negative_layer_names(tiny_pair):
    """'resid_post.-1' names B's (and A's) last block, as collect does: the grid keys it canonically."""
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and more text."]
    kw = dict(batch_size=2, progress=False)
    g = S.layer_grid(tiny_pair, texts, points_a=["embed", "resid_post.-1"], points_b=["resid_post.-2"], **kw)
    ref = S.layer_grid(tiny_pair, texts, points_a=["embed", "resid_post.3"], points_b=["resid_post.2"], **kw)
    assert (g.points_a, g.points_b) == (["embed", "resid_post.3"], ["resid_post.2"])
    assert torch.equal(g.values, ref.values) and (g.values > 0).all()
