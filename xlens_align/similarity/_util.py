"""Input checks and small helpers shared by the similarity measures (all float64)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.stats import check_finite

__all__ = ["DegenerateInputWarning", "SmallSampleWarning"]


class DegenerateInputWarning(RuntimeWarning):
    """An input has zero variance (all rows identical): the measure returns its documented
    "no shared structure" value (0 for similarities, sqrt(2) for `procrustes_distance`)."""


class SmallSampleWarning(UserWarning):
    """Too few rows for the estimator to be trustworthy (e.g. biased CKA with n < d, CCA with
    n <= d_x + d_y where canonical correlations become trivially 1)."""


def as_matrix(x: Tensor, name: str) -> Float[Tensor, "n d"]:
    """Check that `x` is a finite, non-empty 2-D float tensor and return it in float64."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D with shape [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    check_finite(x, name)
    return x.to(torch.float64)


def as_pair(
    X: Tensor, Y: Tensor, min_n: int, what: str
) -> tuple[Float[Tensor, "n dx"], Float[Tensor, "n dy"]]:
    """Validate a pair of [n, d] inputs describing the same n items; return both in float64."""
    x = as_matrix(X, "X")
    y = as_matrix(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (row i of both = the same item), "
            f"got X {tuple(x.shape)} and Y {tuple(y.shape)}"
        )
    if x.shape[0] < min_n:
        raise ValueError(f"{what} needs at least {min_n} rows, got n={x.shape[0]}")
    if y.device != x.device:
        y = y.to(x.device)
    return x, y


def rank_eps(x: Tensor) -> float:
    """Machine epsilon of the input's precision (float32 inputs get float32's epsilon)."""
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.finfo(x.dtype).eps
    return torch.finfo(torch.float64).eps


def center(x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    return x - x.mean(0, keepdim=True)


def zero_variance(xc: Float[Tensor, "n d"], x: Float[Tensor, "n d"]) -> bool:
    """True when all rows of `x` are identical (its centred version `xc` is rounding noise)."""
    scale = float(x.abs().max())
    return float(xc.abs().max()) <= 1e-12 * scale


def warn_degenerate(name: str, measure: str, value: Any) -> Any:
    warnings.warn(
        f"{name} has zero variance (all rows identical): {measure} is undefined; returning {value}",
        DegenerateInputWarning,
        stacklevel=3,
    )
    return value


def finite_or_raise(value: Tensor | float, what: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} is not finite ({v}); the input is numerically degenerate")
    return v


def orth_basis(
    xc: Float[Tensor, "n d"], eps: float
) -> tuple[Float[Tensor, "n r"], Float[Tensor, " r"], Float[Tensor, "r d"]]:
    """Thin SVD of a centred matrix truncated to its numerical rank.

    Singular values below ``s_max * max(n, d) * eps`` (eps of the input's precision) are dropped.
    """
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0], s[:0], vh[:0]
    tol = float(s[0]) * max(xc.shape) * eps
    r = int((s > tol).sum())
    return u[:, :r], s[:r], vh[:r]
