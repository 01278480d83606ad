"""Centred kernel alignment (CKA), biased and debiased, linear and RBF kernels.

Biased CKA (Kornblith et al. 2019) is ``HSIC_0(K, L) / sqrt(HSIC_0(K, K) HSIC_0(L, L))`` with
``HSIC_0(K, L) = tr(K H L H) / (n - 1)^2``. It is strongly biased upwards when n is not much
larger than d (independent Gaussian data give about d / (n + d)). Debiased CKA replaces HSIC_0 by
the unbiased U-statistic of Song et al. (2012)::

    HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3))

where K~ is K with its diagonal set to zero. HSIC_1 is the Frobenius inner product of the
*U-centred* Grams, ``<U(K), U(L)> / (n (n-3))`` (Szekely & Rizzo 2014), which is what the streamed
`MinibatchCKA` exploits. HSIC_1(K, K) = ||U(K)||^2 / (n(n-3)) is never negative.

Zero-variance input (all rows of X or Y identical) makes CKA 0/0: every function here then
returns 0.0 and emits a `DegenerateInputWarning`.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.stats import CrossStats, StatsGrid
from xlens_align.validate import optional_positive_float

from ._util import (
    DegenerateInputWarning,
    SmallSampleWarning,
    as_matrix,
    as_pair,
    center,
    centred,
    finite_or_raise,
    scale_exponent,
    scaled64,
    warn_degenerate,
)

__all__ = [
    "cka",
    "cka_from_stats",
    "cka_grid_from_stats",
    "gram_linear",
    "gram_rbf",
    "hsic_biased",
    "hsic_unbiased",
    "u_center",
]


# -- Gram matrices ----------------------------------------------------------------------------
def gram_linear(X: Float[Tensor, "n d"]) -> Float[Tensor, "n n"]:
    """Linear-kernel Gram matrix of the centred rows, float64."""
    x = as_matrix(X, "X")
    e = scale_exponent(x)  # computed at unit scale, scaled back exactly: inf only if it overflows
    xc = center(scaled64(x, e))
    k = torch.ldexp(xc @ xc.T, torch.tensor(2 * e, device=xc.device))
    if not bool(torch.isfinite(k).all()):
        raise ValueError(
            f"gram_linear: X holds values up to {float(x.abs().max()):.3g}; their products overflow "
            "float64. Rescale X (cka and the other measures are scale invariant and rescale themselves)"
        )
    return k


def _sq_dists(xc: Float[Tensor, "n d"]) -> Float[Tensor, "n n"]:
    r = (xc * xc).sum(1)
    d2 = r[:, None] + r[None, :] - 2.0 * (xc @ xc.T)
    d2.clamp_(min=0.0)
    d2.fill_diagonal_(0.0)
    return d2


def _median(v: Tensor) -> float:
    s = torch.sort(v).values
    m = s.numel()
    return float(s[m // 2]) if m % 2 else float(0.5 * (s[m // 2 - 1] + s[m // 2]))


def _rbf_from_centred(xc: Float[Tensor, "n d"], sigma: float | None, name: str) -> Float[Tensor, "n n"]:
    d2 = _sq_dists(xc)
    n = d2.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=d2.device).triu_(1)
    dist = d2[upper].sqrt_()
    med = _median(dist)
    if med == 0.0:
        pos = dist[dist > 0]
        if pos.numel() == 0:
            raise ValueError(f"{name}: all pairwise distances are 0; RBF bandwidth undefined")
        med = _median(pos)
        warnings.warn(
            f"{name}: more than half of the rows are duplicates (median pairwise distance 0); "
            "RBF bandwidth uses the median of the non-zero distances",
            DegenerateInputWarning,
            stacklevel=3,
        )
    bw = (1.0 if sigma is None else sigma) * med
    return torch.exp(d2 / (-2.0 * bw * bw))


def gram_rbf(X: Float[Tensor, "n d"], sigma: float | None = None) -> Float[Tensor, "n n"]:
    """RBF Gram ``exp(-||x_i - x_j||^2 / (2 bw^2))`` with ``bw = sigma * median pairwise distance``.

    `sigma` is a multiplier of the median heuristic (None means 1.0), as in Kornblith et al.
    """
    optional_positive_float(sigma, "sigma")
    x = scaled64(as_matrix(X, "X"))  # the median bandwidth makes the kernel scale invariant
    return _rbf_from_centred(center(x), sigma, "X")


def _prep_rbf(x: Tensor, name: str, debiased: bool = True, sigma: float | None = None) -> Tensor | None:
    """A point's (U- or double-)centred RBF Gram, flattened to unit norm: RBF CKA of two points
    is the dot product of theirs (None: zero variance, CKA 0)."""
    optional_positive_float(sigma, "sigma")
    _check_bool(debiased, "debiased")
    xc = centred(x)
    if xc is None:
        return warn_degenerate(name, "CKA", None)
    k = _rbf_from_centred(xc, sigma, name)
    k = u_center(k, inplace=True) if debiased else _double_center(k)
    nrm = torch.linalg.matrix_norm(k)
    return None if float(nrm) == 0.0 else (k / nrm).flatten()


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _pair_dot(a: Tensor | None, b: Tensor | None) -> float:
    return 0.0 if a is None or b is None else float(a @ b)


# -- HSIC estimators --------------------------------------------------------------------------
def _check_grams(K: Tensor, L: Tensor, min_n: int) -> int:
    for name, g in (("K", K), ("L", L)):
        if not isinstance(g, Tensor) or g.ndim != 2 or g.shape[0] != g.shape[1]:
            raise ValueError(f"{name} must be a square [n, n] tensor")
    if K.shape != L.shape:
        raise ValueError(f"K and L must have the same shape, got {tuple(K.shape)} and {tuple(L.shape)}")
    n = K.shape[0]
    if n < min_n:
        raise ValueError(f"this HSIC estimator needs at least {min_n} rows, got n={n}")
    return n


def hsic_unbiased(K: Float[Tensor, "n n"], L: Float[Tensor, "n n"]) -> float:
    """Unbiased HSIC_1 of Song et al. (2012), computed from its definition (needs n >= 4)."""
    n = _check_grams(K, L, 4)
    kt = K.to(torch.float64).clone().fill_diagonal_(0.0)
    lt = L.to(torch.float64).clone().fill_diagonal_(0.0)
    tr = (kt * lt.T).sum()
    k1, l1 = kt.sum(), lt.sum()
    klsum = kt.sum(0) @ lt.sum(1)
    return float((tr + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 * klsum / (n - 2)) / (n * (n - 3)))


def hsic_biased(K: Float[Tensor, "n n"], L: Float[Tensor, "n n"]) -> float:
    """Biased HSIC_0 = tr(K H L H) / (n - 1)^2."""
    n = _check_grams(K, L, 2)
    kc = _double_center(K.to(torch.float64))
    return float((kc * L.to(torch.float64).T).sum() / (n - 1) ** 2)


def _double_center(K: Tensor) -> Tensor:
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def u_center(K: Float[Tensor, "*b n n"], inplace: bool = False) -> Float[Tensor, "*b n n"]:
    """U-centring of (a batch of) symmetric Gram matrices: ``<U(K), U(L)> / (n(n-3)) = HSIC_1``.

    ``U_ij = K_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2))`` off the diagonal, 0 on it, with
    r the row sums and s the total of K with zeroed diagonal.
    """
    n = K.shape[-1]
    if n < 4:
        raise ValueError(f"U-centring needs n >= 4 rows, got n={n}")
    u = K if inplace else K.clone()
    u.diagonal(dim1=-2, dim2=-1).zero_()
    r = u.sum(-1)
    s = r.sum(-1)
    u.sub_(r.unsqueeze(-1) / (n - 2))
    u.sub_(r.unsqueeze(-2) / (n - 2))
    u.add_((s / ((n - 1) * (n - 2)))[..., None, None])
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u


def _cka_from_grams(K: Tensor, L: Tensor, debiased: bool) -> Tensor:
    if debiased:
        k, lm = u_center(K), u_center(L)
    else:
        k, lm = _double_center(K), _double_center(L)
    den = torch.sqrt((k * k).sum() * (lm * lm).sum())
    if float(den) == 0.0:
        warnings.warn(
            "a kernel matrix has zero (U-)centred norm: CKA is undefined; returning 0.0",
            DegenerateInputWarning,
            stacklevel=3,
        )
        return torch.zeros((), dtype=torch.float64)
    return (k * lm).sum() / den


def _linear_cka_features(xc: Tensor, yc: Tensor, debiased: bool) -> Tensor:
    """Linear CKA in feature space, O(n d^2): exact same value as the Gram route."""
    sxy = (xc.T @ yc).square().sum()
    sxx = (xc.T @ xc).square().sum()
    syy = (yc.T @ yc).square().sum()
    if not debiased:
        den = torch.sqrt(sxx * syy)
        return sxy / den
    n = xc.shape[0]
    a, b = (xc * xc).sum(1), (yc * yc).sum(1)
    # with centred data K~1 = -a, 1'K~1 = -sum(a) and 1'K~L~1 = a.b
    c1, c2 = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2)
    hxy = sxy - a @ b + a.sum() * b.sum() * c1 - c2 * (a @ b)
    hxx = sxx - a @ a + a.sum() ** 2 * c1 - c2 * (a @ a)
    hyy = syy - b @ b + b.sum() ** 2 * c1 - c2 * (b @ b)
    return hxy / torch.sqrt(hxx.clamp(min=0.0) * hyy.clamp(min=0.0))


def cka(
    X: Float[Tensor, "n dx"],
    Y: Float[Tensor, "n dy"],
    kernel: Literal["linear", "rbf"] = "linear",
    debiased: bool = True,
    sigma: float | None = None,
) -> float:
    """CKA between the rows of X and Y (same n items), in float64.

    kernel: "linear" or "rbf" (bandwidth = `sigma` x median pairwise distance, sigma None = 1).
    debiased: use the unbiased HSIC (needs n >= 4; default). The biased estimator warns with
    `SmallSampleWarning` when n < max(d_x, d_y).
    Zero-variance X or Y: returns 0.0 with a `DegenerateInputWarning`.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    _check_bool(debiased, "debiased")
    if kernel == "linear" and sigma is not None:
        raise ValueError("sigma only applies to kernel='rbf'")
    optional_positive_float(sigma, "sigma")
    x, y = as_pair(X, Y, 4 if debiased else 2, "debiased CKA" if debiased else "CKA")
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if not debiased and n < max(dx, dy):
        warnings.warn(
            f"biased CKA with n={n} rows < d={max(dx, dy)} features is inflated towards 1 even for "
            "unrelated data; prefer debiased=True",
            SmallSampleWarning,
            stacklevel=2,
        )
    xc, yc = centred(x), centred(y)
    if xc is None or yc is None:
        return warn_degenerate("X" if xc is None else "Y", "CKA", 0.0)
    if kernel == "rbf":
        value = _cka_from_grams(
            _rbf_from_centred(xc, sigma, "X"), _rbf_from_centred(yc, sigma, "Y"), debiased
        )
    elif dx * dx + dy * dy + dx * dy <= n * (dx + dy):
        value = _linear_cka_features(xc, yc, debiased)
    else:
        value = _cka_from_grams(xc @ xc.T, yc @ yc.T, debiased)
    return finite_or_raise(value, "CKA")


# -- from streamed statistics -----------------------------------------------------------------
def _check_stats(obj: object, cls: type, arg: str) -> None:
    if not isinstance(obj, cls):
        raise TypeError(f"{arg} must be a {cls.__name__}, got {type(obj).__name__}")
    if obj.n < 2:  # type: ignore[attr-defined]
        raise ValueError(f"{arg} needs at least 2 accumulated rows, has {obj.n}")  # type: ignore[attr-defined]


def cka_from_stats(stats: CrossStats) -> float:
    """Biased linear CKA from centred co-moments: ``||S_xy||_F^2 / (||S_xx||_F ||S_yy||_F)``.

    Equals ``cka(X, Y, debiased=False)`` on the concatenation of every batch fed to `stats`.
    """
    _check_stats(stats, CrossStats, "stats")
    if stats.n < max(stats.d_x, stats.d_y):
        warnings.warn(
            f"biased CKA with n={stats.n} rows < d={max(stats.d_x, stats.d_y)} is inflated towards 1",
            SmallSampleWarning,
            stacklevel=2,
        )
    nx = torch.linalg.matrix_norm(stats.x.s)
    ny = torch.linalg.matrix_norm(stats.y.s)
    for name, nrm in (("X", nx), ("Y", ny)):
        if float(nrm) == 0.0:
            return warn_degenerate(name, "CKA", 0.0)
    return finite_or_raise(stats.sxy.square().sum() / (nx * ny), "CKA")


def cka_grid_from_stats(grid: StatsGrid) -> Float[Tensor, "pa pb"]:
    """Biased linear CKA for every pair of a `StatsGrid`, as a float64 [PA, PB] tensor.

    Each point's ``||S||_F`` is computed once. Pairs the grid did not accumulate are NaN;
    zero-variance points give 0.0 with a `DegenerateInputWarning`.
    """
    _check_stats(grid, StatsGrid, "grid")
    na = {p: float(torch.linalg.matrix_norm(m.s)) for p, m in grid.moments_a.items()}
    nb = {p: float(torch.linalg.matrix_norm(m.s)) for p, m in grid.moments_b.items()}
    for side, norms in (("A", na), ("B", nb)):
        zero = [p for p, v in norms.items() if v == 0.0]
        if zero:
            warnings.warn(
                f"points {zero} of model {side} have zero variance: their CKA is set to 0.0",
                DegenerateInputWarning,
                stacklevel=2,
            )
    out = torch.full((len(grid.points_a), len(grid.points_b)), float("nan"), dtype=torch.float64)
    for (a, b), sxy in grid.cross.items():
        den = na[a] * nb[b]
        v = float(sxy.square().sum()) / den if den > 0 else 0.0
        out[grid.points_a.index(a), grid.points_b.index(b)] = v
    return out
