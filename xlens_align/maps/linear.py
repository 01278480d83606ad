"""Closed-form linear alignment maps: Procrustes, Affine (ridge), LowRank (reduced-rank), CCA.

All four are solved in float64 from second moments, so `fit(X, Y)` and
`fit_stats(CrossStats)` run the same code (`fit` just accumulates the statistics of its
tensors first) and nothing needs all activations in memory.

Notation. The preprocessors (`preprocess.py`) send x to ``x' = (clamp(x) - o_x) D_x`` and y to
``y' = (y - o_y) D_y``; `o` is the mean when centring (default), else 0. Every kind solves for
a matrix ``C`` (``coef_``) with ``y' ~ x' C``, using only the moments of the preprocessed data
about the offsets: ``S_xx = X'^T X'``, ``S_xy = X'^T Y'``, ``S_yy = Y'^T Y'`` over n rows. The
map in raw coordinates is then

    Y_hat = clamp(X) @ weight_ + bias_,  weight_ = D_x C D_y^{-1},  bias_ = o_y - o_x weight_.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.maps.base import AlignmentMap, register, split_indices, stats_of
from xlens_align.maps.preprocess import Preprocessor, make_preprocessors
from xlens_align.stats import CrossStats

__all__ = ["CCA", "LinearMap", "Affine", "LowRank", "Procrustes", "ridge_coef"]

_EPS = torch.finfo(torch.float64).eps


@dataclass
class Prepared:
    """Second moments of preprocessed data about the preprocessing offsets (see module doc)."""

    n: int
    sxx: Float[Tensor, "dx dx"]
    syy: Float[Tensor, "dy dy"]
    sxy: Float[Tensor, "dx dy"]


def prepare(stats: CrossStats, px: Preprocessor, py: Preprocessor) -> Prepared:
    """Moments of ``x' = (x - o_x) D_x``, ``y' = (y - o_y) D_y`` from centred `stats` (exact)."""
    n = stats.n
    dx = stats.mean_x - px.offset
    dy = stats.mean_y - py.offset
    sxx = stats.x.s + n * torch.outer(dx, dx)
    syy = stats.y.s + n * torch.outer(dy, dy)
    sxy = stats.sxy + n * torch.outer(dx, dy)
    sxx = px.mul_left(px.mul_left(sxx).T)
    syy = py.mul_left(py.mul_left(syy).T)
    sxy = px.mul_left(py.mul_left(sxy.T).T)
    return Prepared(n, 0.5 * (sxx + sxx.T), 0.5 * (syy + syy.T), sxy)


def _pinv_solve(a: Tensor, b: Tensor) -> Tensor:
    lam, q = torch.linalg.eigh(a)
    tol = max(float(lam.max()), 0.0) * a.shape[0] * _EPS
    inv = torch.where(lam > tol, 1.0 / lam, torch.zeros_like(lam))
    return q @ (inv[:, None] * (q.T @ b))


def ridge_coef(sxx: Tensor, sxy: Tensor, n: int, alpha: float) -> Tensor:
    """``(S_xx + n alpha I)^{-1} S_xy``: minimiser of mean ||y' - x'C||^2 + alpha ||C||_F^2.

    Cholesky when well conditioned, else a pseudo-inverse through an eigendecomposition
    (minimum-norm least squares when S_xx is singular and alpha = 0).
    """
    a = sxx + (n * alpha) * torch.eye(sxx.shape[0], dtype=sxx.dtype, device=sxx.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        diag = chol.diagonal().square()
        if float(diag.min()) > float(a.diagonal().max()) * a.shape[0] * 1e3 * _EPS:
            return torch.cholesky_solve(sxy, chol)
    return _pinv_solve(a, sxy)


def _inv_sqrt(c: Tensor) -> tuple[Tensor, Tensor]:
    """(C^{-1/2}, C^{1/2}) of a symmetric PSD matrix; null directions get 0 in the inverse."""
    lam, q = torch.linalg.eigh(c)
    tol = max(float(lam.max()), 0.0) * c.shape[0] * _EPS
    lam = lam.clamp_min(0)
    inv = torch.where(lam > tol, lam.rsqrt(), torch.zeros_like(lam))
    return (q * inv) @ q.T, (q * lam.sqrt()) @ q.T


class LinearMap(AlignmentMap):
    """Base of the closed-form maps: ``Y_hat = clamp(X) @ weight_ + bias_``.

    Fitted: ``coef_`` (preprocessed coordinates), ``weight_`` [d_in, d_out] and ``bias_`` [d_out]
    (raw coordinates, float64), ``prep_x_`` / ``prep_y_`` (`Preprocessor`), ``n_samples_``,
    ``d_in_``, ``d_out_``.

    Preprocessing hyper-parameters (shared by every kind): ``center`` (subtract means; off: no
    intercept), ``standardize`` / ``whiten`` (True/'both', 'x', 'y' or False; whitening is ZCA
    with ``whiten_eps`` relative to the mean variance), ``clamp`` (input side: a quantile q in
    (0.5, 1) clamps each dimension of X to its [1-q, q] training quantiles; or precomputed
    ``(lo, hi)`` thresholds, the only form usable with `fit_stats`, whose statistics must then
    come from activations clamped the same way).
    """

    # -- fitting ------------------------------------------------------------------------------
    def _clamped_stats(self, X: Tensor, Y: Tensor, px: Preprocessor) -> CrossStats:
        if px.clamp_lo is None:
            return stats_of(X, Y)
        st = CrossStats.empty(X.shape[1], Y.shape[1], device=X.device)
        for i in range(0, X.shape[0], 16384):
            st.update(px.clamp(X[i : i + 16384].double()), Y[i : i + 16384])
        return st

    def _fit(self, X: Tensor, Y: Tensor) -> None:
        self._check_params(X.shape[1], Y.shape[1])
        px, py = self._preprocessors(self._resolve_clamp(X, X.shape[1]), X.shape[1])
        self._fit_from(self._clamped_stats(X, Y, px), px, py)

    def fit_stats(self, stats: CrossStats, val_stats: CrossStats | None = None) -> LinearMap:
        """Fit from streamed float64 statistics (e.g. ``StatsGrid[pa, pb]``); returns self."""
        _check_stats(stats, "stats")
        if val_stats is not None:
            raise ValueError(
                f"val_stats is only used by Affine(alpha='cv'); {type(self).__name__} does not take it"
            )
        self._check_params(stats.d_x, stats.d_y)
        px, py = self._preprocessors(self._resolve_clamp(None, stats.d_x), stats.d_x)
        self._fit_from(stats, px, py)
        return self

    def _fit_from(self, stats: CrossStats, px: Preprocessor, py: Preprocessor) -> None:
        px.fit_moments(stats.x)
        py.fit_moments(stats.y)
        coef = self._solve(prepare(stats, px, py))
        self._set_linear(coef, px, py, stats.n)

    def _set_linear(self, coef: Tensor, px: Preprocessor, py: Preprocessor, n: int) -> None:
        # contiguous: a strided view would take another matmul kernel after a save/load round trip
        coef = coef.contiguous()
        weight = px.mul_left(py.inv_mul_left(coef.T).T).contiguous()
        self.coef_ = coef
        self.weight_ = weight
        self.bias_ = (py.offset - px.offset @ weight).contiguous()
        self.prep_x_, self.prep_y_ = px, py
        self.n_samples_ = int(n)
        self.d_in_, self.d_out_ = int(coef.shape[0]), int(coef.shape[1])

    def _check_params(self, d_in: int, d_out: int) -> None:
        """Validate hyper-parameters against the data's dimensions (subclasses extend)."""

    def _solve(self, p: Prepared) -> Float[Tensor, "d_in d_out"]:
        raise NotImplementedError

    # -- use ----------------------------------------------------------------------------------
    def _predict64(self, X: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        Xd = self.prep_x_.clamp(X.to(torch.float64))
        return torch.addmm(self.bias_.to(Xd.device), Xd, self.weight_.to(Xd.device))

    def score_stats(self, stats: CrossStats) -> dict[str, float]:
        """Exact ``r2``, ``r2_mean``, ``fvu``, ``mse``, ``n`` on held-out data from its moments alone
        (no cosine: it is not a function of the moments). Clamping must already be in `stats`."""
        self._check_fitted()
        _check_stats(stats, "stats")
        if stats.shape != (self.d_in_, self.d_out_):
            raise ValueError(f"stats have shape {stats.shape}, the map is {(self.d_in_, self.d_out_)}")
        dev = stats.sxy.device
        W, b = self.weight_.to(dev), self.bias_.to(dev)
        mr = stats.mean_y - stats.mean_x @ W - b
        sst_j = stats.y.s.diagonal()
        sse_j = (
            sst_j - 2 * (W * stats.sxy).sum(0) + ((stats.x.s @ W) * W).sum(0) + stats.n * mr.square()
        ).clamp_min(0)
        sse, sst = float(sse_j.sum()), float(sst_j.sum())
        if sst <= 0:
            raise ValueError("Y has zero variance: R^2 is undefined")
        ok = sst_j > 0
        return {
            "r2": 1 - sse / sst,
            "r2_mean": float((1 - sse_j[ok] / sst_j[ok]).mean()),
            "fvu": sse / sst,
            "mse": sse / (stats.n * self.d_out_),
            "n": stats.n,
        }


def _check_stats(stats: Any, name: str) -> None:
    if not isinstance(stats, CrossStats):
        raise TypeError(f"{name} must be a CrossStats, got {type(stats).__name__}")
    if stats.n < 2:
        raise ValueError(f"{name} hold {stats.n} rows; fitting needs at least 2")


def _copy_stats(st: CrossStats) -> CrossStats:
    return CrossStats.from_state_dict({k: v.clone() for k, v in st.state_dict().items()})


def _positive_int(value: Any, name: str, upper: int, upper_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value > upper:
        raise ValueError(f"{name}={value} exceeds {upper_name}={upper}")
    return value


def _nonneg_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    return float(value)


@register("procrustes")
class Procrustes(LinearMap):
    """Orthogonal Procrustes map ``y' ~ s x' R``.

    ``R = U V^T`` from the thin SVD ``S_xy = U S V^T``: orthogonal when d_A = d_B, else the
    d_A x d_B matrix with orthonormal rows (d_A < d_B) or columns (d_A > d_B) maximising
    ``tr(R^T S_xy)``. With ``scale=True`` the least-squares isotropic scale
    ``s = tr(S) / tr(R^T S_xx R)``, else s = 1. Fitted: ``rotation_`` (R), ``scale_`` (s).
    """

    def __init__(
        self,
        scale: bool = False,
        *,
        center: bool = True,
        standardize: bool | str = False,
        whiten: bool | str = False,
        whiten_eps: float = 1e-6,
        clamp: float | tuple[Any, Any] | None = None,
    ) -> None:
        self.scale = scale
        self.center = center
        self.standardize = standardize
        self.whiten = whiten
        self.whiten_eps = whiten_eps
        self.clamp = clamp

    def _solve(self, p: Prepared) -> Tensor:
        u, s, vh = torch.linalg.svd(p.sxy, full_matrices=False)
        rot = u @ vh
        scale = 1.0
        if self.scale:
            denom = float(((p.sxx @ rot) * rot).sum())
            scale = float(s.sum()) / denom if denom > 0 else 0.0
        self.rotation_ = rot.contiguous()
        self.scale_ = scale
        return scale * rot


@register("affine")
class Affine(LinearMap):
    """Affine (ridge) map: ``C = (S_xx + n alpha I)^{-1} S_xy`` plus the intercept from the means.

    `alpha` is on the covariance scale: C minimises ``mean_i ||y'_i - x'_i C||^2 + alpha ||C||_F^2``
    (0 = ordinary least squares, minimum-norm when under-determined). ``alpha="cv"`` picks it from
    `alphas` (default: ``mean variance of x' * 10**linspace(-6, 3, 19)``) by the validation squared
    error in the preprocessed target space: with tensors on a seeded split holding out
    `cv_fraction` of the rows (`split_indices(n, cv_fraction, seed)`), with statistics from
    ``fit_stats(train_stats, val_stats=...)`` exactly from the validation moments. One
    eigendecomposition of S_xx serves the whole grid. With ``refit=True`` the final map is refit on
    train + validation at the chosen alpha. Fitted: ``alpha_``; with cv also ``cv_alphas_`` and
    ``cv_mse_`` (validation mean squared error per row, ``sum ||y' - y'_hat||^2 / n_val``).
    """

    def __init__(
        self,
        alpha: float | str = 0.0,
        *,
        alphas: tuple[float, ...] | None = None,
        cv_fraction: float = 0.2,
        seed: int = 0,
        refit: bool = True,
        center: bool = True,
        standardize: bool | str = False,
        whiten: bool | str = False,
        whiten_eps: float = 1e-6,
        clamp: float | tuple[Any, Any] | None = None,
    ) -> None:
        self.alpha = alpha
        self.alphas = alphas
        self.cv_fraction = cv_fraction
        self.seed = seed
        self.refit = refit
        self.center = center
        self.standardize = standardize
        self.whiten = whiten
        self.whiten_eps = whiten_eps
        self.clamp = clamp

    @property
    def _cv(self) -> bool:
        return isinstance(self.alpha, str)

    def _check_params(self, d_in: int, d_out: int) -> None:
        if self._cv:
            if self.alpha != "cv":
                raise ValueError(f"alpha must be a float >= 0 or 'cv', got {self.alpha!r}")
            if self.alphas is not None:
                if len(self.alphas) == 0:
                    raise ValueError("alphas must hold at least one value")
                for a in self.alphas:
                    _nonneg_float(a, "each of alphas")
        else:
            _nonneg_float(self.alpha, "alpha")

    def _fit(self, X: Tensor, Y: Tensor) -> None:
        if not self._cv:
            super()._fit(X, Y)
            return
        self._check_params(X.shape[1], Y.shape[1])
        px, py = self._preprocessors(self._resolve_clamp(X, X.shape[1]), X.shape[1])
        tr, va = split_indices(X.shape[0], self.cv_fraction, self.seed)
        train = self._clamped_stats(X[tr], Y[tr], px)
        val = self._clamped_stats(X[va], Y[va], px)
        self._fit_cv(train, val, px)

    def fit_stats(self, stats: CrossStats, val_stats: CrossStats | None = None) -> Affine:
        """Fit from statistics; with ``alpha="cv"`` `val_stats` (held-out rows) is required."""
        if not self._cv:
            return super().fit_stats(stats, val_stats)
        _check_stats(stats, "stats")
        if val_stats is None:
            raise ValueError(
                "Affine(alpha='cv').fit_stats needs val_stats=CrossStats of held-out rows to choose alpha "
                "(or give a fixed alpha)"
            )
        _check_stats(val_stats, "val_stats")
        if val_stats.shape != stats.shape:
            raise ValueError(f"val_stats have shape {val_stats.shape}, stats {stats.shape}")
        self._check_params(stats.d_x, stats.d_y)
        px, _ = self._preprocessors(self._resolve_clamp(None, stats.d_x), stats.d_x)
        self._fit_cv(stats, val_stats, px)
        return self

    def _fit_cv(self, train: CrossStats, val: CrossStats, px: Preprocessor) -> None:
        _, py = make_preprocessors(self.center, self.standardize, self.whiten, self.whiten_eps)
        px.fit_moments(train.x)
        py.fit_moments(train.y)
        p, v = prepare(train, px, py), prepare(val, px, py)
        lam, q = torch.linalg.eigh(p.sxx)
        g = q.T @ p.sxy  # C(alpha) = q diag(f) g with f = 1 / (lam + n alpha)
        # validation SSE(alpha) = f^T (Q^T V_xx Q o g g^T) f - 2 f . h + tr(V_yy)
        quad = (q.T @ v.sxx @ q) * (g @ g.T)
        h = ((q.T @ v.sxy) * g).sum(1)
        const = float(v.syy.trace())
        tol = max(float(lam.max()), 0.0) * lam.shape[0] * _EPS
        if self.alphas is None:
            mean_var = float(p.sxx.trace()) / (p.n * p.sxx.shape[0])
            grid = [(mean_var if mean_var > 0 else 1.0) * 10.0**e for e in torch.linspace(-6, 3, 19).tolist()]
        else:
            grid = [float(a) for a in self.alphas]
        mses = []
        for a in grid:
            den = lam + p.n * a
            f = torch.where(den > tol, 1.0 / den, torch.zeros_like(den))
            sse = float(f @ quad @ f) - 2.0 * float(f @ h) + const
            mses.append(max(sse, 0.0) / v.n)
        best = min(range(len(grid)), key=lambda i: (mses[i], -grid[i]))
        self.alpha_ = grid[best]
        self.cv_alphas_ = grid
        self.cv_mse_ = mses
        if self.refit:
            merged = _copy_stats(train).merge_(val)
            px2, py2 = self._preprocessors(
                None if px.clamp_lo is None else (px.clamp_lo, px.clamp_hi), train.d_x
            )
            self._fit_from(merged, px2, py2)
        else:
            self._set_linear(ridge_coef(p.sxx, p.sxy, p.n, self.alpha_), px, py, train.n)

    def _solve(self, p: Prepared) -> Tensor:
        if not self._cv:
            self.alpha_ = float(self.alpha)
        return ridge_coef(p.sxx, p.sxy, p.n, self.alpha_)


@register("low_rank")
class LowRank(LinearMap):
    """Reduced-rank (ridge) regression: ``C_r = C V_r V_r^T``.

    C is the Affine solution at `alpha`; V_r [d_out, rank] are the top eigenvectors of the fitted
    values' second moment ``C^T S_xx C`` (the top right singular vectors of X'C), i.e. the
    rank-`rank` map closest to C in the training-data metric. At rank = min(d_in, d_out) it equals
    Affine. Fitted: ``components_`` (V_r), ``singular_values_`` (RMS of the fitted values along
    each component), ``alpha_``.
    """

    def __init__(
        self,
        rank: int,
        alpha: float = 0.0,
        *,
        center: bool = True,
        standardize: bool | str = False,
        whiten: bool | str = False,
        whiten_eps: float = 1e-6,
        clamp: float | tuple[Any, Any] | None = None,
    ) -> None:
        self.rank = rank
        self.alpha = alpha
        self.center = center
        self.standardize = standardize
        self.whiten = whiten
        self.whiten_eps = whiten_eps
        self.clamp = clamp

    def _check_params(self, d_in: int, d_out: int) -> None:
        _positive_int(self.rank, "rank", min(d_in, d_out), "min(d_in, d_out)")
        _nonneg_float(self.alpha, "alpha")

    def _solve(self, p: Prepared) -> Tensor:
        self.alpha_ = float(self.alpha)
        coef = ridge_coef(p.sxx, p.sxy, p.n, self.alpha_)
        fitted = coef.T @ p.sxx @ coef
        lam, vecs = torch.linalg.eigh(0.5 * (fitted + fitted.T))
        top = torch.argsort(lam, descending=True)[: self.rank]
        v = vecs[:, top]
        self.components_ = v.contiguous()
        self.singular_values_ = (lam[top].clamp_min(0) / p.n).sqrt()
        return (coef @ v) @ v.T


@register("cca")
class CCA(LinearMap):
    """Regression of Y on X through the top-`k` canonical variates.

    With regularised covariances ``R_x = C_xx + reg * mean_var_x * I`` (same for y; ``C = S / n``
    of the preprocessed data), the whitened cross-covariance ``R_x^{-1/2} C_xy R_y^{-1/2} = U P V^T``
    gives canonical correlations P (``correlations_``) and directions ``A = R_x^{-1/2} U_k``
    (``x_weights_``), ``B = R_y^{-1/2} V_k`` (``y_weights_``). The canonical variates
    ``u = x' A`` (unit variance) predict ``v = y' B`` as ``v_hat = u diag(rho_k)``, and y' is
    recovered from v by its least-squares regression ``y'_hat = v_hat B^T R_y``:

        y'_hat = x' A_k diag(rho_k) B_k^T R_y  (+ means; see module docstring)

    At k = min(d_in, d_out) with reg = 0 this is ordinary least squares (Affine); smaller k keeps
    only the k most correlated directions.
    """

    def __init__(
        self,
        k: int,
        reg: float = 1e-6,
        *,
        center: bool = True,
        standardize: bool | str = False,
        whiten: bool | str = False,
        whiten_eps: float = 1e-6,
        clamp: float | tuple[Any, Any] | None = None,
    ) -> None:
        self.k = k
        self.reg = reg
        self.center = center
        self.standardize = standardize
        self.whiten = whiten
        self.whiten_eps = whiten_eps
        self.clamp = clamp

    def _check_params(self, d_in: int, d_out: int) -> None:
        _positive_int(self.k, "k", min(d_in, d_out), "min(d_in, d_out)")
        _nonneg_float(self.reg, "reg")

    def _regularised(self, s: Tensor, n: int) -> Tensor:
        c = s / n
        mean_var = float(c.diagonal().mean())
        eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        return c + self.reg * (mean_var if mean_var > 0 else 1.0) * eye

    def _solve(self, p: Prepared) -> Tensor:
        isq_x, _ = _inv_sqrt(self._regularised(p.sxx, p.n))
        isq_y, sq_y = _inv_sqrt(self._regularised(p.syy, p.n))
        u, rho, vh = torch.linalg.svd(isq_x @ (p.sxy / p.n) @ isq_y, full_matrices=False)
        k = self.k
        a = isq_x @ u[:, :k]
        self.correlations_ = rho[:k].clone()
        self.x_weights_ = a.contiguous()
        self.y_weights_ = (isq_y @ vh[:k].T).contiguous()
        return (a * rho[:k]) @ (vh[:k] @ sq_y)
