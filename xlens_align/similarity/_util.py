"""Input checks and small helpers shared by the similarity measures (all float64)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.validate import check_matrix, check_pair

__all__ = ["DegenerateInputWarning", "SmallSampleWarning"]


class DegenerateInputWarning(RuntimeWarning):
    """An input has zero variance (all rows identical): the measure returns its documented
    "no shared structure" value (0 for similarities, sqrt(2) for `procrustes_distance`)."""


class SmallSampleWarning(UserWarning):
    """Too few rows for the estimator to be trustworthy (e.g. biased CKA with n < d, CCA with
    n <= d_x + d_y where canonical correlations become trivially 1)."""


def as_matrix(x: Any, name: str) -> Float[Tensor, "n d"]:
    """`validate.check_matrix` (finite [n, d] float tensor, n, d >= 1), returned in float64."""
    return check_matrix(x, name).to(torch.float64)


def as_pair(X: Any, Y: Any, min_n: int, what: str) -> tuple[Float[Tensor, "n dx"], Float[Tensor, "n dy"]]:
    """`validate.check_pair` (paired rows, n >= `min_n`, Y on X's device), both in float64 and
    rescaled by `scaled64` (every measure here is invariant to scaling an input)."""
    x, y = check_pair(X, Y, min_rows=min_n, what=what)
    return scaled64(x), scaled64(y)


def scale_exponent(x: Tensor) -> int:
    """The power of two e with ``max |x| * 2**-e`` in [0.5, 1) (0 for an empty, all-zero or
    non-finite `x`)."""
    top = x.abs().max() if x.numel() else x.new_zeros(())
    if not 0.0 < float(top) < float("inf"):
        return 0
    return int(torch.frexp(top.to(torch.float64)).exponent)


def fixed_exponent(exponents: dict[Any, int], key: Any, x: Tensor) -> int:
    """The power of two kept in `exponents` for `key`, set from `x` (`scale_exponent`) the first
    time: streamed CKA-like measures scale each point by one fixed factor, which keeps them exact."""
    if key not in exponents:
        exponents[key] = scale_exponent(x)
    return exponents[key]


def scaled64(x: Tensor, exponent: int | None = None) -> Float[Tensor, "n d"]:
    """`x` in float64 times ``2**-exponent`` (default `scale_exponent(x)`: the largest |value|
    lands in [0.5, 1)).

    For the scale-invariant measures: values near 1e200 would overflow their squares and values
    near 1e-200 underflow them; a power of two rescales exactly (no rounding)."""
    x = x.to(torch.float64)
    e = scale_exponent(x) if exponent is None else exponent
    return torch.ldexp(x, torch.tensor(-e, device=x.device)) if e else x


def point_list(points: Any, arg: str) -> list[str] | None:
    """None (the default points), one point name, or a non-empty sequence of them, as a list."""
    if points is None:
        return None
    if isinstance(points, str):
        return [points]
    if not isinstance(points, Sequence) or not points:
        raise ValueError(f"{arg} must name at least one point (a name or a list of names), got {points!r}")
    return list(points)


def same_rows(tensors: Iterable[Tensor], what: str) -> int:
    """The common row count of `tensors` (ValueError naming `what` when they differ)."""
    ns = {t.shape[0] for t in tensors}
    if len(ns) != 1:
        raise ValueError(f"{what} must all have the same number of rows, got {sorted(ns)}")
    return ns.pop()


def rank_eps(x: Tensor) -> float:
    """Machine epsilon of the input's precision (float32 inputs get float32's epsilon)."""
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.finfo(x.dtype).eps
    return torch.finfo(torch.float64).eps


def center(x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    return x - x.mean(0, keepdim=True)


def centred(x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"] | None:
    """`x` minus its column means, or None when all rows of `x` are identical (the centred
    matrix is rounding noise: zero variance)."""
    xc = center(x)
    return None if float(xc.abs().max()) <= 1e-12 * float(x.abs().max()) else xc


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
