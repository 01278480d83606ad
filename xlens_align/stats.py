"""Streaming float64 statistics of paired activations.

`CrossStats` keeps, for one pair of activation streams X [n, d_x] and Y [n, d_y], the count,
the means and the *centred* co-moment matrices S_xx, S_yy, S_xy (sums of outer products of
deviations from the mean). Batches are merged exactly with Chan et al.'s pairwise update, so
the result equals the statistics of the concatenated data up to float64 rounding, whatever the
batch sizes, and memory does not depend on the number of rows.

`StatsGrid` does the same for every (point of A, point of B) pair of a layer grid, sharing the
per-point moments between pairs so that each point's X^T X is accumulated once.

Everything is accumulated in float64, whatever dtype comes in (fp16 squared norms overflow).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.validate import check_finite, positive_int

__all__ = ["CHUNK_ROWS", "CrossStats", "Moments", "StatsGrid"]

CHUNK_ROWS = 16384
"""Rows per chunk wherever whole tensors are reduced piecewise (statistics, predictions): it bounds
the float64 copies (16384 x 4096 x 8 bytes = 512 MiB at Llama's width)."""


def _as_2d(x: Tensor, name: str) -> Float[Tensor, "n d"]:
    """`x` must be a finite floating tensor [n, d] (n = 0 allowed: an empty batch adds nothing)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, d], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [n, d], got shape {tuple(x.shape)}")
    check_finite(x, name)
    _check_range(x, name)
    return x


_MAX_ABS = 1e140
"""Largest |value| the statistics accept (and 1 / _MAX_ABS the smallest non-zero one): sums of
squares of many such values stay inside float64's range."""


def _check_range(x: Tensor, name: str) -> None:
    """Statistics are sums of squares: refuse values whose squares leave float64's range."""
    top = float(x.abs().max()) if x.numel() else 0.0
    if top > _MAX_ABS or 0.0 < top < 1.0 / _MAX_ABS:
        way = "overflow" if top > _MAX_ABS else "underflow to 0"
        raise ValueError(
            f"{name} holds values whose largest |value| is {top:.3g}: their squares {way} in float64, "
            f"the statistics need |values| within [{1 / _MAX_ABS:.0e}, {_MAX_ABS:.0e}]; rescale the data "
            "(CKA is scale invariant, and a map fit on c X, c Y is the map of X, Y rescaled)"
        )


def _as_2d_f64(x: Tensor, name: str, device: torch.device | None = None) -> Float[Tensor, "n d"]:
    return _as_2d(x, name).to(device=device if device is not None else x.device, dtype=torch.float64)


@dataclass
class Moments:
    """Count, mean and centred co-moment S = sum (x - mean)(x - mean)^T of one stream."""

    n: int
    mean: Float[Tensor, " d"]
    s: Float[Tensor, "d d"]

    @classmethod
    def empty(cls, d: int, device: torch.device | str = "cpu") -> Moments:
        z = torch.zeros(d, dtype=torch.float64, device=device)
        return cls(0, z, torch.zeros(d, d, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, x: Float[Tensor, "n d"]) -> Moments:
        mean = x.mean(0)
        xc = x - mean
        return cls(x.shape[0], mean, xc.T @ xc)

    @property
    def d(self) -> int:
        return self.mean.shape[0]

    def merge_(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.s = other.n, other.mean.clone(), other.s.clone()
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.s = self.s + other.s + torch.outer(delta, delta) * (self.n * other.n / n)
        self.mean = self.mean + delta * (other.n / n)
        self.n = n
        return self

    def covariance(self, ddof: int = 1) -> Float[Tensor, "d d"]:
        if self.n - ddof <= 0:
            raise ValueError(f"covariance needs more than {ddof} rows, have {self.n}")
        return self.s / (self.n - ddof)

    def gram(self) -> Float[Tensor, "d d"]:
        """Uncentred X^T X."""
        return self.s + self.n * torch.outer(self.mean, self.mean)


@dataclass
class CrossStats:
    """Streaming float64 statistics of a paired stream (X, Y): n, means, S_xx, S_yy, S_xy.

    >>> st = CrossStats.empty(d_x, d_y)
    >>> for X, Y in batches: st.update(X, Y)
    >>> st.cov_xy  # [d_x, d_y], unbiased
    """

    x: Moments
    y: Moments
    sxy: Float[Tensor, "dx dy"]

    @classmethod
    def empty(cls, d_x: int, d_y: int, device: torch.device | str = "cpu") -> CrossStats:
        positive_int(d_x, "d_x")
        positive_int(d_y, "d_y")
        return cls(
            Moments.empty(d_x, device),
            Moments.empty(d_y, device),
            torch.zeros(d_x, d_y, dtype=torch.float64, device=device),
        )

    def copy(self) -> CrossStats:
        return CrossStats(
            Moments(self.x.n, self.x.mean.clone(), self.x.s.clone()),
            Moments(self.y.n, self.y.mean.clone(), self.y.s.clone()),
            self.sxy.clone(),
        )

    @classmethod
    def from_data(
        cls,
        X: Float[Tensor, "n dx"],
        Y: Float[Tensor, "n dy"],
        *,
        chunk: int = CHUNK_ROWS,
        map_x: Callable[[Tensor], Tensor] | None = None,
    ) -> CrossStats:
        """Statistics of (X, Y) on X's device, accumulated `chunk` rows at a time (so only one
        chunk is ever copied to float64). `map_x`, if given, is applied to each float64 chunk of
        X first (e.g. a map's winsorizing)."""
        X, Y = _as_2d(X, "X"), _as_2d(Y, "Y")
        chunk = positive_int(chunk, "chunk")
        st = cls.empty(X.shape[1], Y.shape[1], device=X.device)
        for i in range(0, X.shape[0], chunk):
            x = X[i : i + chunk].to(torch.float64)
            st.update(x if map_x is None else map_x(x), Y[i : i + chunk])
        return st

    # -- accumulation -------------------------------------------------------------------------
    def update(self, X: Float[Tensor, "n dx"], Y: Float[Tensor, "n dy"]) -> CrossStats:
        dev = self.sxy.device
        X = _as_2d_f64(X, "X", dev)
        Y = _as_2d_f64(Y, "Y", dev)
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"X and Y must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
        if X.shape[1] != self.d_x or Y.shape[1] != self.d_y:
            raise ValueError(
                f"expected X [n, {self.d_x}] and Y [n, {self.d_y}], got {tuple(X.shape)} and {tuple(Y.shape)}"
            )
        if X.shape[0] == 0:
            return self
        mx, my = X.mean(0), Y.mean(0)
        Xc, Yc = X - mx, Y - my
        batch = CrossStats(Moments(X.shape[0], mx, Xc.T @ Xc), Moments(Y.shape[0], my, Yc.T @ Yc), Xc.T @ Yc)
        return self.merge_(batch)

    def merge_(self, other: CrossStats) -> CrossStats:
        """Merge `other` into self in place (exact, Chan et al.)."""
        if (other.d_x, other.d_y) != (self.d_x, self.d_y):
            raise ValueError(f"cannot merge stats of shape {other.shape} into {self.shape}")
        if other.n and self.n:
            n = self.n + other.n
            dx = other.x.mean - self.x.mean
            dy = other.y.mean - self.y.mean
            self.sxy = self.sxy + other.sxy + torch.outer(dx, dy) * (self.n * other.n / n)
        elif other.n:
            self.sxy = other.sxy.clone()
        self.x.merge_(other.x)
        self.y.merge_(other.y)
        return self

    # -- read-outs ----------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.x.n

    @property
    def d_x(self) -> int:
        return self.x.d

    @property
    def d_y(self) -> int:
        return self.y.d

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_x, self.d_y)

    @property
    def mean_x(self) -> Tensor:
        return self.x.mean

    @property
    def mean_y(self) -> Tensor:
        return self.y.mean

    def _need(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"need at least {k} accumulated rows, have {self.n}")

    @property
    def cov_xx(self) -> Tensor:
        return self.x.covariance()

    @property
    def cov_yy(self) -> Tensor:
        return self.y.covariance()

    @property
    def cov_xy(self) -> Tensor:
        self._need(2)
        return self.sxy / (self.n - 1)

    @property
    def xtx(self) -> Tensor:
        return self.x.gram()

    @property
    def yty(self) -> Tensor:
        return self.y.gram()

    @property
    def xty(self) -> Tensor:
        return self.sxy + self.n * torch.outer(self.x.mean, self.y.mean)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "n": torch.tensor(self.n, dtype=torch.int64),
            "mean_x": self.x.mean,
            "mean_y": self.y.mean,
            "sxx": self.x.s,
            "syy": self.y.s,
            "sxy": self.sxy,
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> CrossStats:
        n = int(sd["n"])
        return cls(Moments(n, sd["mean_x"], sd["sxx"]), Moments(n, sd["mean_y"], sd["syy"]), sd["sxy"])


class StatsGrid:
    """Streaming statistics for every requested (point of A, point of B) pair at once.

    Each point's own moments are accumulated once and shared by every pair that uses it;
    the cross co-moment is accumulated per pair. `grid[pa, pb]` returns a `CrossStats`.
    """

    def __init__(
        self,
        points_a: Iterable[str],
        points_b: Iterable[str],
        pairs: Iterable[tuple[str, str]] | None = None,
    ) -> None:
        for arg, pts in (("points_a", points_a), ("points_b", points_b), ("pairs", pairs)):
            if isinstance(pts, str):
                raise TypeError(f"{arg} must be a list, got the single string {pts!r}; wrap it in a list")
        self.points_a = list(points_a)
        self.points_b = list(points_b)
        if not self.points_a or not self.points_b:
            raise ValueError("points_a and points_b must each name at least one point")
        self.pairs = (
            list(pairs) if pairs is not None else [(a, b) for a in self.points_a for b in self.points_b]
        )
        for cell in self.pairs:
            if not isinstance(cell, tuple | list) or len(cell) != 2:
                raise ValueError(f"pairs must hold (point of A, point of B) tuples, got {cell!r}")
            if cell[0] not in self.points_a or cell[1] not in self.points_b:
                raise ValueError(f"pair {tuple(cell)!r} uses a point not in points_a/points_b")
        self.pairs = [tuple(cell) for cell in self.pairs]
        self.moments_a: dict[str, Moments] = {}
        self.moments_b: dict[str, Moments] = {}
        self.cross: dict[tuple[str, str], Tensor] = {}

    @property
    def n(self) -> int:
        return next(iter(self.moments_a.values())).n if self.moments_a else 0

    def update(self, acts_a: Mapping[str, Tensor], acts_b: Mapping[str, Tensor]) -> StatsGrid:
        for side, pts, acts in (("a", self.points_a, acts_a), ("b", self.points_b, acts_b)):
            missing = [p for p in pts if p not in acts]
            if missing:
                raise ValueError(f"acts_{side} lacks points {missing}")
        xs = {p: _as_2d_f64(acts_a[p], f"acts_a[{p!r}]") for p in self.points_a}
        ys = {p: _as_2d_f64(acts_b[p], f"acts_b[{p!r}]") for p in self.points_b}
        for side, new, old in (("a", xs, self.moments_a), ("b", ys, self.moments_b)):
            for p, t in new.items():
                if p in old and t.shape[1] != old[p].d:
                    raise ValueError(
                        f"acts_{side}[{p!r}] has {t.shape[1]} features, earlier updates had {old[p].d}"
                    )
        ns = {t.shape[0] for t in (*xs.values(), *ys.values())}
        if len(ns) != 1:
            raise ValueError(
                f"all activations in one update must have the same number of rows, got {sorted(ns)}"
            )
        nb = ns.pop()
        if nb == 0:
            return self
        # centre each point once per batch; every pair then costs one in-place matrix product
        xc = {p: x - x.mean(0) for p, x in xs.items()}
        yc = {p: y - y.mean(0) for p, y in ys.items()}
        bx = {p: Moments(nb, xs[p].mean(0), c.T @ c) for p, c in xc.items()}
        by = {p: Moments(nb, ys[p].mean(0), c.T @ c) for p, c in yc.items()}
        n0 = self.n
        n = n0 + nb
        for a, b in self.pairs:
            if n0 == 0:
                self.cross[a, b] = xc[a].T @ yc[b]
            else:
                dx = bx[a].mean - self.moments_a[a].mean
                dy = by[b].mean - self.moments_b[b].mean
                cross = self.cross[a, b]
                cross.addmm_(xc[a].T, yc[b])
                cross.addr_(dx, dy, alpha=n0 * nb / n)
        for store, batch_m in ((self.moments_a, bx), (self.moments_b, by)):
            for p, m in batch_m.items():
                if p in store:
                    store[p].merge_(m)
                else:
                    store[p] = m
        return self

    def __getitem__(self, key: tuple[str, str]) -> CrossStats:
        if key not in self.cross:
            if self.n == 0 and key in self.pairs:
                raise ValueError(
                    f"no statistics for pair {key!r}: the grid holds 0 rows (every update was empty, e.g. "
                    "the row filters dropped every row); nothing can be fitted or compared"
                )
            more = f" (and {len(self.pairs) - 6} more)" if len(self.pairs) > 6 else ""
            raise KeyError(f"pair {key!r} is not among the grid's pairs {self.pairs[:6]}{more}")
        a, b = key
        ma, mb = self.moments_a[a], self.moments_b[b]
        # a snapshot: later updates of the grid (in place) and merges into the result stay apart
        return CrossStats(ma, mb, self.cross[key]).copy()
