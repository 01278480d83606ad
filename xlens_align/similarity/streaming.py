"""Streamed minibatch CKA for a whole layer grid in one pass (Nguyen et al. 2021).

For each minibatch of n rows, every point's linear Gram matrix ``X_c X_c^T`` (n x n, float64) is
U-centred, so that ``<U(K), U(L)> / (n(n-3))`` is Song et al.'s unbiased HSIC_1. The U-centred
Grams of all points of a model are flattened into one [P, n*n] matrix; one product
``Ka @ Kb.T`` gives the HSIC of every (A, B) pair, the squared row norms the self-HSICs. The
per-minibatch estimates are averaged (weighted by minibatch rows: a plain average for
equal-sized minibatches) and

    CKA_ab = mean HSIC_1(K_a, L_b) / sqrt(mean HSIC_1(K_a, K_a) * mean HSIC_1(L_b, L_b)).

State is O(P_A * P_B) numbers plus at most one pending minibatch: memory does not grow with the
number of tokens; the transient cost per minibatch is (P_A + P_B) n^2 float64 numbers.

``precision="float64"`` is that path. "float32", "tf32" and "bf16" form the Grams of each side
with one batched product from features rounded once (centred first where a point's mean is large,
`fastgram`), and combine float64 row sums into the same unbiased HSIC; the HSIC sums are float64
in every case. "auto" (the default) is float64 except on CUDA, where it is bf16: on an H200, 33x33
points at d=4096 over 100k tokens take 0.350 s instead of 2.10 s, with CKA within 7.6e-7 of
float64 (0.450 s when every layer has a large mean and is centred; 2.8e-6 on the default grid of
`benchmarks/similarity.py`, which prints both); tf32 is ~10x more accurate (7.6e-8) and slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.validate import check_finite

from ._util import DegenerateInputWarning, fixed_exponent, point_list, same_rows, scaled64
from .cka import u_center
from .fastgram import check_precision, hsic_terms, resolve_precision, side_grams

__all__ = ["MinibatchCKA"]


class MinibatchCKA:
    """Accumulator of debiased linear minibatch CKA for every (point of A, point of B) pair.

    >>> acc = MinibatchCKA(minibatch_size=1024)
    >>> for pb in batches: acc.update(pb.a, pb.b)     # dicts point -> Tensor [n, d]
    >>> grid = acc.compute()                          # float64 [P_A, P_B]

    points_a / points_b: which points to use, in this order (default: keys of the first update).
    minibatch_size: rows per minibatch. None: each `update` is one minibatch as given (as in
    the paper); an int: rows are re-chunked into minibatches of exactly this size (so memory is
    bounded whatever the update sizes); `compute` then also counts a pending partial minibatch
    of >= 4 rows without consuming it. Every minibatch needs at least 4 rows.
    device: where Grams are computed (default: the device of the first update's tensors).
    precision: "float64" (float64 Grams, U-centred), "float32" (IEEE float32 Grams), "tf32" or
    "bf16" (Grams from TF32 / bfloat16 inputs with float32 accumulation), all with float64 HSIC
    sums; "auto": float64 unless the device is CUDA, tf32 there (`resolved_precision` says which).
    `update` also accepts two plain tensors (one point per side, `compute` gives [1, 1]).
    """

    def __init__(
        self,
        points_a: Sequence[str] | None = None,
        points_b: Sequence[str] | None = None,
        *,
        minibatch_size: int | None = None,
        device: torch.device | str | None = None,
        precision: str = "auto",
    ) -> None:
        if minibatch_size is not None and (not isinstance(minibatch_size, int) or minibatch_size < 4):
            raise ValueError(f"minibatch_size must be None or an int >= 4, got {minibatch_size!r}")
        self.points_a = point_list(points_a, "points_a")
        self.points_b = point_list(points_b, "points_b")
        self.minibatch_size = minibatch_size
        self.device = torch.device(device) if device is not None else None
        self.precision = check_precision(precision)
        self._dims: dict[tuple[str, str], int] = {}
        self._exponents: dict[tuple[str, int], int] = {}
        self._scale_t: dict[str, Tensor] = {}
        self._sum_ab: Tensor | None = None
        self._sum_aa: Tensor | None = None
        self._sum_bb: Tensor | None = None
        self._weight = 0.0
        self.n_minibatches = 0
        self.n_rows = 0  # rows in processed minibatches
        self._pending_a: list[_Rows] = []
        self._pending_b: list[_Rows] = []
        self._pending_n = 0

    @property
    def resolved_precision(self) -> str | None:
        """The precision in use ("auto" resolved on the device; None before the first update)."""
        return None if self.device is None else resolve_precision(self.precision, self.device)

    @property
    def pending_rows(self) -> int:
        """Rows waiting for a full minibatch (re-chunking mode only)."""
        return self._pending_n

    # -- input handling -----------------------------------------------------------------------
    def _check(self, acts: Mapping[str, Tensor] | Tensor, side: str, finite: bool = True) -> list[Tensor]:
        if isinstance(acts, Tensor):
            acts = {side: acts}
        if not isinstance(acts, Mapping):
            raise TypeError(f"acts_{side} must be a dict point -> Tensor [n, d], got {type(acts).__name__}")
        attr = "points_a" if side == "a" else "points_b"
        if getattr(self, attr) is None:
            if not acts:
                raise ValueError(f"acts_{side} is empty")
            setattr(self, attr, list(acts))
        points = getattr(self, attr)
        missing = [p for p in points if p not in acts]
        if missing:
            raise ValueError(f"acts_{side} lacks points {missing}")
        out = []
        for p in points:
            t = acts[p]
            name = f"acts_{side}[{p!r}]"
            if not isinstance(t, Tensor) or t.ndim != 2:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a Tensor [n, d], got {shape}")
            if not torch.is_floating_point(t):
                check_finite(t, name)  # raises the TypeError
            d = self._dims.setdefault((side, p), t.shape[1])
            if t.shape[1] != d:
                raise ValueError(f"{name} has {t.shape[1]} features, earlier updates had {d}")
            out.append(t)
        if finite:
            _check_finite(out, points, side)
        return out

    def update(
        self, acts_a: Mapping[str, Tensor] | Tensor, acts_b: Mapping[str, Tensor] | Tensor
    ) -> MinibatchCKA:
        """Add paired activations (row i of every tensor = the same token)."""
        xs, ys = self._check(acts_a, "a", finite=False), self._check(acts_b, "b", finite=False)
        n = same_rows((*xs, *ys), "the activations of one update")
        if n == 0:
            return self
        if self.device is None:
            self.device = xs[0].device
        if self.minibatch_size is None:
            if n < 4:
                raise ValueError(
                    f"each minibatch needs at least 4 rows for the unbiased HSIC, got an update of {n}; with "
                    "minibatch_size=None every update is one minibatch: pass minibatch_size=1024 to re-chunk"
                )
            # the reduced-precision paths check finiteness from the column means they compute
            self._add(*self._hsic(xs, ys, checked=False))
            return self
        _check_finite(xs, self.points_a or [], "a")
        _check_finite(ys, self.points_b or [], "b")
        self._pending_a.append(_Rows(xs))
        self._pending_b.append(_Rows(ys))
        self._pending_n += n
        m = self.minibatch_size
        while self._pending_n >= m:
            xa, xb = self._take(m)
            self._add(*self._hsic(xa, xb))
        if self._pending_n:  # own the < m leftover rows: callers may reuse their buffers
            for pending in (self._pending_a, self._pending_b):
                pending[:] = [_Rows([t.clone() for t in _Rows.cat(pending).ts])]
        return self

    def _take(self, m: int) -> tuple[list[Tensor], list[Tensor]]:
        """Pop the first m pending rows as one list of tensors per side."""
        out = []
        for pending in (self._pending_a, self._pending_b):
            cat = _Rows.cat(pending)
            out.append([t[:m] for t in cat.ts])
            rest = _Rows([t[m:] for t in cat.ts])
            pending[:] = [rest] if rest.n else []
        self._pending_n -= m
        return out[0], out[1]

    # -- the computation ----------------------------------------------------------------------
    def _grams(self, ts: list[Tensor], n: int, side: str) -> Tensor:
        k = torch.empty(len(ts), n, n, dtype=torch.float64, device=self.device)
        for i, t in enumerate(ts):
            # each point keeps the power of two that its first minibatch needed (CKA is scale
            # invariant; a fixed factor per point leaves every ratio exact): no overflow at 1e200
            e = fixed_exponent(self._exponents, (side, i), t)
            x = scaled64(t.to(self.device), e)
            x = x - x.mean(0, keepdim=True)
            torch.mm(x, x.T, out=k[i])
        return u_center(k, inplace=True).view(len(ts), n * n)

    def _fast(self, ts: list[Tensor], side: str, precision: str):
        scales = [2.0 ** -fixed_exponent(self._exponents, (side, i), t) for i, t in enumerate(ts)]
        if side not in self._scale_t:  # the exponents are fixed from here on: one copy to the device
            self._scale_t[side] = torch.tensor(scales, dtype=torch.float64, device=self.device)
        return side_grams(ts, scales, precision, self._scale_t[side])

    def _hsic(
        self, xs: list[Tensor], ys: list[Tensor], checked: bool = True
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        n = xs[0].shape[0]
        precision = self.resolved_precision
        if precision != "float64":
            ga, gb = self._fast(xs, "a", precision), self._fast(ys, "b", precision)
            terms = hsic_terms(ga, gb)  # queued before the one host sync of the check below
            if checked or bool(ga.finite & gb.finite):
                return *terms, n
            # names the culprit; all finite: a float32 column mean overflowed, so this minibatch
            # goes the float64 way
            checked = False
        if not checked:
            _check_finite(xs, self.points_a or [], "a")
            _check_finite(ys, self.points_b or [], "b")
        ka = self._grams(xs, n, "a")
        kb = self._grams(ys, n, "b")
        scale = 1.0 / (n * (n - 3))
        hab = (ka @ kb.T) * scale
        haa = torch.linalg.vector_norm(ka, dim=1).square() * scale
        hbb = torch.linalg.vector_norm(kb, dim=1).square() * scale
        return hab, haa, hbb, n

    def _add(self, hab: Tensor, haa: Tensor, hbb: Tensor, n: int) -> None:
        if self._sum_ab is None:
            self._sum_ab, self._sum_aa, self._sum_bb = hab * n, haa * n, hbb * n
        else:
            self._sum_ab += hab * n
            self._sum_aa += haa * n
            self._sum_bb += hbb * n
        self._weight += n
        self.n_minibatches += 1
        self.n_rows += n

    _STATE = ("sum_ab", "sum_aa", "sum_bb", "weight", "n_minibatches", "n_rows", "exponents")

    def state(self) -> dict[str, Any]:
        """The float64 HSIC sums and counts `compute` rests on, and the power of two each point's
        rows are scaled by (``exponents``, {("a" | "b", index): e}), for merging the accumulators of
        several processes (`xlens_align.distributed.reduce_cka`). A pending partial minibatch of
        >= 4 rows is counted as one minibatch first."""
        if self._pending_n >= 4:
            self._add(*self._hsic(_Rows.cat(self._pending_a).ts, _Rows.cat(self._pending_b).ts))
            self._pending_a, self._pending_b, self._pending_n = [], [], 0
        own = (self._sum_ab, self._sum_aa, self._sum_bb, self._weight, self.n_minibatches, self.n_rows)
        return dict(zip(self._STATE, (*own, dict(self._exponents)), strict=True))

    def load_state(self, state: Mapping[str, Any]) -> MinibatchCKA:
        """Replace the sums, counts and exponents by `state`'s (as `state` returns them)."""
        self._sum_ab, self._sum_aa, self._sum_bb = state["sum_ab"], state["sum_aa"], state["sum_bb"]
        self._weight, self.n_minibatches = float(state["weight"]), int(state["n_minibatches"])
        self.n_rows = int(state["n_rows"])
        self._exponents, self._scale_t = dict(state["exponents"]), {}
        return self

    def mean_hsic(self) -> tuple[Float[Tensor, "pa pb"], Float[Tensor, " pa"], Float[Tensor, " pb"]]:
        """Row-weighted mean unbiased HSIC: (A x B pairs, A self, B self), pending rows included."""
        sums = [self._sum_ab, self._sum_aa, self._sum_bb]
        weight = self._weight
        if self._pending_n >= 4:
            hab, haa, hbb, n = self._hsic(_Rows.cat(self._pending_a).ts, _Rows.cat(self._pending_b).ts)
            new = [hab * n, haa * n, hbb * n]
            sums = new if sums[0] is None else [s + d for s, d in zip(sums, new, strict=True)]
            weight += n
        if sums[0] is None:
            raise ValueError(
                f"MinibatchCKA has {self._pending_n} rows, no minibatch of the 4 or more rows that the "
                "unbiased HSIC needs: update() it with more rows first"
            )
        return sums[0] / weight, sums[1] / weight, sums[2] / weight

    def compute(self) -> Float[Tensor, "pa pb"]:
        """Debiased minibatch CKA for every (A, B) pair, float64 [P_A, P_B] on `device`.

        A point with zero self-HSIC (constant activations) gets CKA 0.0 and a
        `DegenerateInputWarning`.
        """
        hab, haa, hbb = self.mean_hsic()
        den = torch.sqrt(haa.clamp(min=0.0)[:, None] * hbb.clamp(min=0.0)[None, :])
        bad_a = [p for p, v in zip(self.points_a or [], haa.tolist(), strict=True) if v <= 0]
        bad_b = [p for p, v in zip(self.points_b or [], hbb.tolist(), strict=True) if v <= 0]
        if bad_a or bad_b:
            warnings.warn(
                f"zero self-HSIC (constant activations) at points A {bad_a} B {bad_b}: their CKA is set to 0.0",
                DegenerateInputWarning,
                stacklevel=2,
            )
        return torch.where(
            den > 0, hab / den.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(hab)
        )


def _check_finite(ts: list[Tensor], points: Sequence[str], side: str) -> None:
    """ValueError naming the first point with a non-finite value. One reduction pass (a multi-tensor
    kernel where the tensors allow it) and one device sync for all points: a sum of |x| is
    non-finite when x is (or overflows); the per-tensor check only runs to name the culprit."""
    if not ts:
        return
    try:
        norms = list(torch._foreach_norm(ts, 1))
    except (RuntimeError, TypeError, AttributeError):
        norms = [torch.linalg.vector_norm(t, 1) for t in ts]
    if not bool(torch.isfinite(torch.stack([v.to(ts[0].device) for v in norms])).all()):
        for p, t in zip(points, ts, strict=True):
            check_finite(t, f"acts_{side}[{p!r}]")


class _Rows:
    """A list of same-row-count tensors (one per point) that can be concatenated along rows."""

    def __init__(self, ts: list[Tensor]) -> None:
        self.ts = ts

    @property
    def n(self) -> int:
        return self.ts[0].shape[0] if self.ts else 0

    @staticmethod
    def cat(parts: list[_Rows]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        return _Rows([torch.cat(col, 0) for col in zip(*(p.ts for p in parts), strict=True)])
