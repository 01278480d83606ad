"""Closed-form linear alignment maps: Procrustes, Affine (ridge), LowRank (reduced-rank), CCA.

All four are solved in float64 from second moments, so `fit(X, Y)` and
`fit_stats(CrossStats)` run the same code (`fit` just accumulates the statistics of its
tensors first) and nothing needs all activations in memory.

Notation. The preprocessors (`preprocess.py`) send x to ``x' = (wins(x) - o_x) D_x`` and y to
``y' = (y - o_y) D_y``; `o` is the mean when centring (default), else 0. Every kind solves for
a matrix ``C`` (``coef_``) with ``y' ~ x' C``, using only the moments of the preprocessed data
about the offsets: ``S_xx = X'^T X'``, ``S_xy = X'^T Y'``, ``S_yy = Y'^T Y'`` over n rows. The
map in raw coordinates is then

    Y_hat = wins(X) @ weight_ + bias_,  weight_ = D_x C D_y^{-1},  bias_ = o_y - o_x weight_.

(``wins`` = the optional per-dimension winsorizing of the input, hyper-parameter ``winsorize``.)
"""

from __future__ import annotations

from typing import Any, Unpack

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.files import split_indices
from xlens_align.maps.base import AlignmentMap, error_scores, register
from xlens_align.maps.preprocess import Preprocessing, PreprocessingParams, Preprocessor
from xlens_align.maps.solve import EPS, Prepared, inv_sqrt, prepare, ridge_coef
from xlens_align.stats import CrossStats
from xlens_align.validate import nonneg_float, positive_int

__all__ = ["CCA", "LinearMap", "Affine", "LowRank", "Procrustes"]


class LinearMap(PreprocessingParams, AlignmentMap):
    """Base of the closed-form maps: ``Y_hat = wins(X) @ weight_ + bias_``.

    Fitted: ``coef_`` (preprocessed coordinates), ``weight_`` [d_in, d_out] and ``bias_`` [d_out]
    (raw coordinates, float64), ``prep_x_`` / ``prep_y_`` (`Preprocessor`), ``n_samples_``,
    ``d_in_``, ``d_out_``.

    Preprocessing hyper-parameters (every kind; see `PreprocessingParams`): ``center``,
    ``standardize``, ``whiten``, ``whiten_eps``, ``winsorize`` (with `fit_stats` only as
    precomputed ``(lo, hi)`` thresholds, the statistics coming from activations winsorized the
    same way).
    """

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self, X: Tensor, Y: Tensor) -> None:
        self._check_params(X.shape[1], Y.shape[1])
        px, py = self._preprocessors(X, X.shape[1])
        self._fit_from(CrossStats.from_data(X, Y, map_x=px.winsorize), px, py)

    def fit_stats(self, stats: CrossStats, val_stats: CrossStats | None = None) -> LinearMap:
        """Fit from streamed float64 statistics (e.g. ``StatsGrid[pa, pb]``); returns self."""
        _check_stats(stats, "stats")
        if val_stats is not None:
            raise ValueError(
                f"val_stats is only used by Affine(alpha='cv'); {type(self).__name__} does not take it"
            )
        self._check_params(stats.d_x, stats.d_y)
        px, py = self._preprocessors(None, stats.d_x)
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

    def _tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        d_in, d_out = self.d_in_, self.d_out_
        return {"coef_": (d_in, d_out), "weight_": (d_in, d_out), "bias_": (d_out,)}

    def _solve(self, p: Prepared) -> Float[Tensor, "d_in d_out"]:
        raise NotImplementedError

    # -- use ----------------------------------------------------------------------------------
    def _predict64(self, X: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_out"]:
        Xd = self.prep_x_.winsorize(X.to(torch.float64))
        return torch.addmm(self.bias_.to(Xd.device), Xd, self.weight_.to(Xd.device))

    def score_stats(self, stats: CrossStats) -> dict[str, float]:
        """Exact ``r2``, ``r2_mean``, ``fvu``, ``mse``, ``n`` on held-out data from its moments alone,
        with `score`'s definitions (`error_scores`; no cosine: it is not a function of the
        moments). Winsorizing must already be in `stats`."""
        self._check_fitted()
        _check_stats(stats, "stats")
        if stats.shape != (self.d_in_, self.d_out_):
            raise ValueError(f"stats have shape {stats.shape}, the map is {(self.d_in_, self.d_out_)}")
        dev = stats.sxy.device
        W, b = self.weight_.to(dev), self.bias_.to(dev)
        mr = stats.mean_y - stats.mean_x @ W - b
        sst_j = stats.y.s.diagonal()
        # sum_i ||y_i - x_i W - b||^2 per column, from the centred moments about the means
        sse_j = (
            sst_j - 2 * (W * stats.sxy).sum(0) + ((stats.x.s @ W) * W).sum(0) + stats.n * mr.square()
        ).clamp_min(0)
        return error_scores(sse_j, sst_j, stats.n)


def _check_stats(stats: Any, name: str) -> None:
    if not isinstance(stats, CrossStats):
        raise TypeError(f"{name} must be a CrossStats, got {type(stats).__name__}")
    if stats.n < 2:
        raise ValueError(f"{name} hold {stats.n} rows; fitting needs at least 2")


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _bounded_int(value: Any, name: str, upper: int, upper_name: str) -> int:
    if positive_int(value, name) > upper:
        raise ValueError(f"{name}={value} exceeds {upper_name}={upper}")
    return value


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
        **preprocessing: Unpack[Preprocessing],
    ) -> None:
        self.scale = scale
        self._set_preprocessing(preprocessing)

    def _check_params(self, d_in: int, d_out: int) -> None:
        _check_bool(self.scale, "scale")

    def _tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super()._tensor_shapes(), "rotation_": (self.d_in_, self.d_out_)}

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
    `cv_fraction` of the rows (`xlens_align.files.split_indices(n, cv_fraction, seed)`), with statistics from
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
        **preprocessing: Unpack[Preprocessing],
    ) -> None:
        self.alpha = alpha
        self.alphas = alphas
        self.cv_fraction = cv_fraction
        self.seed = seed
        self.refit = refit
        self._set_preprocessing(preprocessing)

    @property
    def _cv(self) -> bool:
        return isinstance(self.alpha, str)

    def _check_params(self, d_in: int, d_out: int) -> None:
        _check_bool(self.refit, "refit")
        if self._cv:
            if self.alpha != "cv":
                raise ValueError(f"alpha must be a float >= 0 or 'cv', got {self.alpha!r}")
            if self.alphas is not None:
                if len(self.alphas) == 0:
                    raise ValueError("alphas must hold at least one value")
                for a in self.alphas:
                    nonneg_float(a, "each of alphas")
        else:
            nonneg_float(self.alpha, "alpha")

    def _fit(self, X: Tensor, Y: Tensor) -> None:
        if not self._cv:
            super()._fit(X, Y)
            return
        self._check_params(X.shape[1], Y.shape[1])
        if isinstance(self.cv_fraction, bool) or not (
            isinstance(self.cv_fraction, float) and 0.0 < self.cv_fraction < 1.0
        ):
            raise ValueError(f"cv_fraction must be a fraction in (0, 1), got {self.cv_fraction!r}")
        px, py = self._preprocessors(X, X.shape[1])
        tr, va = split_indices(X.shape[0], self.cv_fraction, self.seed, name="cv_fraction")
        tr, va = tr.to(X.device), va.to(X.device)
        train = CrossStats.from_data(X[tr], Y[tr], map_x=px.winsorize)
        val = CrossStats.from_data(X[va], Y[va], map_x=px.winsorize)
        self._fit_cv(train, val, px, py)

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
        px, py = self._preprocessors(None, stats.d_x)
        self._fit_cv(stats, val_stats, px, py)
        return self

    def _fit_cv(self, train: CrossStats, val: CrossStats, px: Preprocessor, py: Preprocessor) -> None:
        px.fit_moments(train.x)
        py.fit_moments(train.y)
        p, v = prepare(train, px, py), prepare(val, px, py)
        lam, q = torch.linalg.eigh(p.sxx)
        g = q.T @ p.sxy  # C(alpha) = q diag(f) g with f = 1 / (lam + n alpha)
        # validation SSE(alpha) = f^T (Q^T V_xx Q o g g^T) f - 2 f . h + tr(V_yy)
        quad = (q.T @ v.sxx @ q) * (g @ g.T)
        h = ((q.T @ v.sxy) * g).sum(1)
        const = float(v.syy.trace())
        tol = max(float(lam.max()), 0.0) * lam.shape[0] * EPS
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
        if self.refit:  # refits the preprocessors' moments on train + validation too
            self._fit_from(train.copy().merge_(val), px, py)
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
        **preprocessing: Unpack[Preprocessing],
    ) -> None:
        self.rank = rank
        self.alpha = alpha
        self._set_preprocessing(preprocessing)

    def _check_params(self, d_in: int, d_out: int) -> None:
        _bounded_int(self.rank, "rank", min(d_in, d_out), "min(d_in, d_out)")
        nonneg_float(self.alpha, "alpha")

    def _tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        r = self.rank
        return {**super()._tensor_shapes(), "components_": (self.d_out_, r), "singular_values_": (r,)}

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
        **preprocessing: Unpack[Preprocessing],
    ) -> None:
        self.k = k
        self.reg = reg
        self._set_preprocessing(preprocessing)

    def _check_params(self, d_in: int, d_out: int) -> None:
        _bounded_int(self.k, "k", min(d_in, d_out), "min(d_in, d_out)")
        nonneg_float(self.reg, "reg")

    def _tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        k, shapes = self.k, super()._tensor_shapes()
        return {
            **shapes,
            "correlations_": (k,),
            "x_weights_": (self.d_in_, k),
            "y_weights_": (self.d_out_, k),
        }

    def _regularised(self, s: Tensor, n: int) -> Tensor:
        c = s / n
        mean_var = float(c.diagonal().mean())
        eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        return c + self.reg * (mean_var if mean_var > 0 else 1.0) * eye

    def _solve(self, p: Prepared) -> Tensor:
        isq_x, _ = inv_sqrt(self._regularised(p.sxx, p.n))
        isq_y, sq_y = inv_sqrt(self._regularised(p.syy, p.n))
        u, rho, vh = torch.linalg.svd(isq_x @ (p.sxy / p.n) @ isq_y, full_matrices=False)
        k = self.k
        a = isq_x @ u[:, :k]
        self.correlations_ = rho[:k].clone()
        self.x_weights_ = a.contiguous()
        self.y_weights_ = (isq_y @ vh[:k].T).contiguous()
        return (a * rho[:k]) @ (vh[:k] @ sq_y)
