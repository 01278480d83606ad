"""Float64 linear algebra of the closed-form maps: moments of preprocessed data, ridge, C^{-1/2}.

`prepare` carries centred `CrossStats` to the second moments of the preprocessed data about the
preprocessing offsets (see `maps.linear`); `ridge_coef` and `inv_sqrt` are the solves the maps
share (the `MLP` and `Adapter` initialise from `ridge_coef` too).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.maps.preprocess import Preprocessor
from xlens_align.stats import CrossStats

__all__ = ["EPS", "Prepared", "inv_sqrt", "prepare", "ridge_coef"]

EPS = torch.finfo(torch.float64).eps


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
    for name, m in (("X", sxx), ("Y", syy), ("X and Y", sxy)):
        if not bool(torch.isfinite(m).all()):
            raise ValueError(
                f"the second moments of {name} overflow float64 (activations of magnitude ~1e150 or more); "
                "rescale or winsorize them before fitting"
            )
    return Prepared(n, 0.5 * (sxx + sxx.T), 0.5 * (syy + syy.T), sxy)


def _pinv_solve(a: Tensor, b: Tensor) -> Tensor:
    lam, q = torch.linalg.eigh(a)
    tol = max(float(lam.max()), 0.0) * a.shape[0] * EPS
    inv = torch.where(lam > tol, 1.0 / lam, torch.zeros_like(lam))
    return q @ (inv[:, None] * (q.T @ b))


def ridge_coef(sxx: Tensor, sxy: Tensor, n: int, alpha: float) -> Tensor:
    """``(S_xx + n alpha I)^{-1} S_xy``: minimiser of mean ||y' - x'C||^2 + alpha ||C||_F^2.

    Cholesky when well conditioned, else a pseudo-inverse through an eigendecomposition
    (minimum-norm least squares when S_xx is singular and alpha = 0).
    """
    if not math.isfinite(n * alpha):
        raise ValueError(
            f"alpha={alpha!r} is too large: n * alpha over n={n} rows overflows float64; "
            f"use alpha below {sys.float_info.max / max(n, 1):.3g}"
        )
    a = sxx + (n * alpha) * torch.eye(sxx.shape[0], dtype=sxx.dtype, device=sxx.device)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        diag = chol.diagonal().square()
        if float(diag.min()) > float(a.diagonal().max()) * a.shape[0] * 1e3 * EPS:
            return torch.cholesky_solve(sxy, chol)
    return _pinv_solve(a, sxy)


def inv_sqrt(c: Tensor) -> tuple[Tensor, Tensor]:
    """(C^{-1/2}, C^{1/2}) of a symmetric PSD matrix; null directions get 0 in the inverse."""
    lam, q = torch.linalg.eigh(c)
    tol = max(float(lam.max()), 0.0) * c.shape[0] * EPS
    lam = lam.clamp_min(0)
    inv = torch.where(lam > tol, lam.rsqrt(), torch.zeros_like(lam))
    return (q * inv) @ q.T, (q * lam.sqrt()) @ q.T
