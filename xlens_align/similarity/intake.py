"""Batches entering a layer grid: the points read are checked, clamped and filtered with the
package's one row-filter vocabulary (`xlens_align.rows`), and every dropped row is counted.

``drop_first`` is a filter on positions: `collect` applies it (a batch's own ``.filtered``
counts say what it dropped). ``massive`` and ``clamp`` act on activations, so a grid applies them
to whatever batches it is given, with `rows.RowFilter`'s own rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from xlens_align.rows import RowFilter
from xlens_align.validate import check_finite

from ._util import same_rows
from .views import ColumnStats

__all__ = [
    "MASSIVE_WARN_RATIO",
    "Recollect",
    "batch_dicts",
    "column_pass",
    "enter",
    "filter_rows",
    "warn_if_massive",
]

#: an unfiltered grid warns when a row's norm exceeds this many times its point's median
MASSIVE_WARN_RATIO = 100.0

Acts = dict[str, Tensor]


def batch_dicts(batch: Any) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
    """The (A, B) dicts point -> Tensor [n, d] of a `PairedBatch` (or of an ``(a, b)`` pair)."""
    if hasattr(batch, "a") and hasattr(batch, "b"):
        return batch.a, batch.b
    if isinstance(batch, tuple | list) and len(batch) == 2:
        a, b = batch
        if isinstance(a, Tensor) and isinstance(b, Tensor):  # one point per side, as MinibatchCKA takes
            return {"a": a}, {"b": b}
        for side, acts in (("a", a), ("b", b)):
            if not isinstance(acts, Mapping):
                raise TypeError(
                    f"batch pair (a, b): {side} must be a dict point -> Tensor [n, d] (or both plain tensors), "
                    f"got {type(acts).__name__}"
                )
        return a, b
    raise TypeError(
        f"each batch must have .a and .b dicts (a PairedBatch) or be a pair (a, b), got {type(batch).__name__}"
    )


def enter(
    acts: Mapping[str, Tensor], points: list[str], side: str, clamp: float | None, widths: dict[str, int]
) -> Acts:
    """The `points` of one side of a batch, each a finite Tensor [n, d] with the width the point had
    in earlier batches (kept in `widths`); with `clamp`, values (infinities included) are clipped
    to [-clamp, clamp] first, and NaN still raises."""
    missing = [p for p in points if p not in acts]
    if missing:
        raise ValueError(f"batch.{side} lacks points {missing}; it has {list(acts)[:12]}")
    out = {}
    for p in points:
        t = acts[p]
        if not isinstance(t, Tensor) or t.ndim != 2:
            raise ValueError(f"batch.{side}[{p!r}] must be a Tensor [n, d]")
        d = widths.setdefault(f"{side}:{p}", t.shape[1])
        if t.shape[1] != d:
            raise ValueError(f"batch.{side}[{p!r}] has {t.shape[1]} features, earlier batches had {d}")
        out[p] = t if clamp is None else t.clamp(-clamp, clamp)
        check_finite(out[p], f"batch.{side}[{p!r}]")
    return out


def filter_rows(a: Acts, b: Acts, rows: RowFilter) -> tuple[Acts, Acts, int, dict[str, int]]:
    """Drop the rows `rows.activations` drops (``massive``: judged on every point of both
    sides); returns the kept (a, b), the number of rows that came in and the drop counts."""
    n = same_rows((*a.values(), *b.values()), "the tensors of one batch")
    keep, counts = rows.activations([*a.values(), *b.values()])
    if not bool(keep.all()):
        a = {p: t[keep.to(t.device)] for p, t in a.items()}
        b = {p: t[keep.to(t.device)] for p, t in b.items()}
    return a, b, n, counts


def warn_if_massive(a: Acts, b: Acts, warned: set[str], stacklevel: int) -> None:
    """Warn (once per point, `warned` remembers) when a row's norm exceeds `MASSIVE_WARN_RATIO`
    times its point's median row norm in the batch: such rows dominate linear CKA."""
    for side, acts in (("A", a), ("B", b)):
        for p, t in acts.items():
            key = f"{side}:{p}"
            if key in warned or t.shape[0] < 2:
                continue
            norms = torch.linalg.vector_norm(t, dim=1, dtype=torch.float64)
            med = float(norms.median())
            ratio = float(norms.max()) / med if med > 0 else 0.0
            if ratio > MASSIVE_WARN_RATIO:
                warned.add(key)
                warnings.warn(
                    f"point {key} has a row whose norm is {ratio:.0f}x the batch's median row norm "
                    f"(over {MASSIVE_WARN_RATIO:.0f}x): massive-activation rows dominate linear CKA, "
                    "Procrustes and CCA; pass massive=5.0 to drop them (and report both)",
                    UserWarning,
                    stacklevel=stacklevel,
                )


def column_pass(
    batches: Iterable[Any], pa: list[str] | None, pb: list[str] | None, rows: RowFilter
) -> dict[tuple[str, str], ColumnStats]:
    """First pass of the "standardized" view: float64 column statistics of every point over the
    rows the grid will use (entered and filtered exactly as in the main pass)."""
    if iter(batches) is batches:
        raise ValueError(
            "view='standardized' needs every row's column statistics before the grid: batches must be "
            "re-iterable (a list, not a generator or iterator); layer_grid collects twice"
        )
    cols: dict[tuple[str, str], ColumnStats] = {}
    widths: dict[str, int] = {}
    for batch in batches:
        a_raw, b_raw = batch_dicts(batch)
        pa = list(a_raw) if pa is None else pa
        pb = list(b_raw) if pb is None else pb
        a, b = enter(a_raw, pa, "a", rows.clamp, widths), enter(b_raw, pb, "b", rows.clamp, widths)
        a, b, _, _ = filter_rows(a, b, rows)
        for side, acts in (("a", a), ("b", b)):
            for p, t in acts.items():
                cols.setdefault((side, p), ColumnStats()).update(t)
    return cols


class Recollect:
    """`collect(*args, **kw)` anew on each iteration (a re-iterable batch source)."""

    def __init__(self, collect: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.collect, self.args, self.kw = collect, args, kw

    def __iter__(self) -> Any:
        return iter(self.collect(*self.args, **self.kw))
