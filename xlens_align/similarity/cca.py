"""Canonical correlation measures: mean CCA correlation, SVCCA and PWCCA.

All three work on orthonormal bases of the centred column spaces (thin SVD, truncated at the
numerical rank of the input's precision): the canonical correlations are the singular values
of ``U_x^T U_y``.

When ``rank(X) + rank(Y) > n - 1`` the two column spaces must intersect and some canonical
correlations are 1 whatever the data: a `SmallSampleWarning` is emitted (use SVCCA, PWCCA or
more rows). Zero-variance X or Y: the measures return 0.0 with a `DegenerateInputWarning`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ._util import (
    SmallSampleWarning,
    as_pair,
    centred,
    finite_or_raise,
    orth_basis,
    rank_eps,
    warn_degenerate,
)

__all__ = ["canonical_correlations", "cca_corr", "pwcca", "svcca"]


@dataclass
class _Basis:
    """Orthonormal basis of a centred input: u [n, r], s [r], vh [r, d]."""

    u: Tensor
    s: Tensor
    vh: Tensor
    name: str

    @property
    def rank(self) -> int:
        return self.u.shape[1]


def _prep_basis(x: Tensor, eps: float, name: str) -> _Basis | None:
    xc = centred(x)
    if xc is None:
        return None
    u, s, vh = orth_basis(xc, eps)
    return _Basis(u, s, vh, name)


def _prep_svcca(x: Tensor, eps: float, name: str, keep: float) -> _Basis | None:
    b = _prep_basis(x, eps, name)
    if b is None:
        return None
    var = b.s.square()
    frac = torch.cumsum(var, 0) / var.sum()
    k = int((frac < keep - 1e-12).sum()) + 1
    k = min(k, b.rank)
    return _Basis(b.u[:, :k], b.s[:k], b.vh[:k], name)


def _warn_small(bx: _Basis, by: _Basis, n: int, what: str) -> None:
    if bx.rank + by.rank > n - 1:
        warnings.warn(
            f"{what}: rank(X)={bx.rank} + rank(Y)={by.rank} > n - 1 = {n - 1}: some canonical "
            "correlations are 1 whatever the data; use more rows (or svcca/pwcca)",
            SmallSampleWarning,
            stacklevel=4,
        )


def _rho(bx: _Basis, by: _Basis) -> Tensor:
    return torch.linalg.svdvals(bx.u.T @ by.u).clamp(0.0, 1.0)


def _pair_mean_cca(bx: _Basis | None, by: _Basis | None, what: str = "CCA") -> float:
    if bx is None or by is None:
        return warn_degenerate("X" if bx is None else "Y", what, 0.0)
    _warn_small(bx, by, bx.u.shape[0], what)
    return finite_or_raise(_rho(bx, by).mean(), what)


def _pair_pwcca(bx: _Basis | None, by: _Basis | None) -> float:
    if bx is None or by is None:
        return warn_degenerate("X" if bx is None else "Y", "PWCCA", 0.0)
    _warn_small(bx, by, bx.u.shape[0], "PWCCA")
    p, rho, _ = torch.linalg.svd(bx.u.T @ by.u, full_matrices=False)
    rho = rho.clamp(0.0, 1.0)
    # canonical variates of X in sample space: H = U_x P (unit columns); projections of X's
    # neurons on them: H^T X_c = P^T diag(s) V^T, so alpha_i = sum_j |<h_i, x_j>|
    alpha = (p.T @ (bx.s[:, None] * bx.vh)).abs().sum(1)
    alpha = alpha / alpha.sum()
    return finite_or_raise((alpha * rho).sum(), "PWCCA")


def canonical_correlations(X: Float[Tensor, "n dx"], Y: Float[Tensor, "n dy"]) -> Float[Tensor, " k"]:
    """All canonical correlations of X and Y, descending, float64 (k = min of the two ranks)."""
    x, y = as_pair(X, Y, 2, "CCA")
    bx, by = _prep_basis(x, rank_eps(X), "X"), _prep_basis(y, rank_eps(Y), "Y")
    if bx is None or by is None:
        warn_degenerate("X" if bx is None else "Y", "CCA", 0.0)
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    _warn_small(bx, by, x.shape[0], "CCA")
    return _rho(bx, by)


def cca_corr(X: Float[Tensor, "n dx"], Y: Float[Tensor, "n dy"]) -> float:
    """Mean canonical correlation between the rows of X and Y (same items), in [0, 1]."""
    x, y = as_pair(X, Y, 2, "CCA")
    return _pair_mean_cca(_prep_basis(x, rank_eps(X), "X"), _prep_basis(y, rank_eps(Y), "Y"))


def _check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not (isinstance(keep, int | float) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep must be a fraction of variance in (0, 1], got {keep!r}")


def svcca(X: Float[Tensor, "n dx"], Y: Float[Tensor, "n dy"], keep: float = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): keep the top singular directions of each centred input that
    explain a fraction `keep` of its variance, then the mean canonical correlation."""
    _check_keep(keep)
    x, y = as_pair(X, Y, 2, "SVCCA")
    bx = _prep_svcca(x, rank_eps(X), "X", keep)
    by = _prep_svcca(y, rank_eps(Y), "Y", keep)
    return _pair_mean_cca(bx, by, "SVCCA")


def pwcca(X: Float[Tensor, "n dx"], Y: Float[Tensor, "n dy"]) -> float:
    """Projection-weighted CCA (Morcos et al. 2018).

    Canonical correlations rho_i weighted by alpha_i proportional to ``sum_j |<h_i, x_j>|``, where
    h_i are X's canonical variates (unit vectors over the n items) and x_j X's centred columns.
    Asymmetric: the weights come from X, the first argument.
    """
    x, y = as_pair(X, Y, 2, "PWCCA")
    return _pair_pwcca(_prep_basis(x, rank_eps(X), "X"), _prep_basis(y, rank_eps(Y), "Y"))
