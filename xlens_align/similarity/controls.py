"""Statistical controls for any similarity measure ``measure(X, Y) -> float``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.files import check_seed
from xlens_align.validate import positive_int

from ._util import as_pair

__all__ = ["Interval", "bootstrap_ci", "permutation_test"]

Measure = Callable[[Tensor, Tensor], float]


class Interval(NamedTuple):
    """A confidence interval ``(low, high)``."""

    low: float
    high: float


def _start(
    measure: Measure, X: Tensor, Y: Tensor, count: int, arg: str, seed: int
) -> tuple[int, torch.Generator]:
    """Check a control's inputs; return the number of items and a generator seeded with `seed`."""
    if not callable(measure):
        raise TypeError(f"measure must be a callable (X, Y) -> float, got {type(measure).__name__}")
    positive_int(count, arg)
    as_pair(X, Y, 2, "paired rows")
    return X.shape[0], torch.Generator().manual_seed(check_seed(seed))


def permutation_test(
    measure: Measure,
    X: Float[Tensor, "n dx"],
    Y: Float[Tensor, "n dy"],
    n_perm: int = 1000,
    seed: int = 0,
    alternative: Literal["greater", "less", "two-sided"] = "greater",
) -> float:
    """Permutation p-value of ``measure(X, Y)`` against ``measure(X, Y[perm])``.

    Shuffling the rows of Y breaks the pairing of items while keeping each side's geometry.
    Returns ``(1 + #{null at least as extreme}) / (n_perm + 1)`` (never 0). Use
    ``alternative="less"`` for distances (e.g. `procrustes_distance`); "two-sided" compares
    absolute deviations from the null mean.
    """
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    n, gen = _start(measure, X, Y, n_perm, "n_perm", seed)
    observed = float(measure(X, Y))
    null = torch.tensor(
        [float(measure(X, Y[torch.randperm(n, generator=gen).to(Y.device)])) for _ in range(n_perm)],
        dtype=torch.float64,
    )
    tol = 1e-12 * max(1.0, abs(observed))
    if alternative == "greater":
        extreme = null >= observed - tol
    elif alternative == "less":
        extreme = null <= observed + tol
    else:
        mu = null.mean()
        extreme = (null - mu).abs() >= abs(observed - float(mu)) - tol
    return float((1 + int(extreme.sum())) / (n_perm + 1))


def bootstrap_ci(
    measure: Measure,
    X: Float[Tensor, "n dx"],
    Y: Float[Tensor, "n dy"],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``measure(X, Y)``, resampling items (rows of both).

    Note that resampling duplicates rows: estimators that treat duplicates as evidence (k-NN
    overlap, debiased HSIC) are shifted on resamples; read the interval as a spread.
    """
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise ValueError(f"level must be a float in (0, 1), got {level!r}")
    n, gen = _start(measure, X, Y, n_boot, "n_boot", seed)
    vals = []
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=gen)
        vals.append(float(measure(X[idx.to(X.device)], Y[idx.to(Y.device)])))
    v = torch.tensor(vals, dtype=torch.float64)
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    lo, hi = torch.quantile(v, q).tolist()
    return Interval(lo, hi)
