"""The measures a layer grid can compute, and how each is computed for every pair of points.

- "cka" (default): debiased linear minibatch CKA (`MinibatchCKA`), streamed in one pass.
- "cka_feature": biased linear CKA from float64 centred co-moments (`StatsGrid`), streamed.
- "cka_rbf", "cca", "svcca", "pwcca", "procrustes", "mutual_knn", "rsa", or any callable
  ``measure(X, Y) -> float``: need all rows in memory (`RowStore`). Each point is prepared once
  (SVD, Gram, kNN sets, RDM ranks) and the preparations are paired for every cell.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import cca as _cca
from . import geometry as _geo
from ._util import DegenerateInputWarning, rank_eps, scaled64
from .cka import _pair_dot, _prep_rbf, cka

__all__ = ["MEASURES", "AllRows", "all_pairs", "pure_function", "resolve_measure"]


@dataclass(frozen=True)
class AllRows:
    """A measure computed on all rows: `prep` once per point, `pair` once per cell."""

    prep: Callable[..., Any]  # (x float64, raw tensor, point name, **kw) -> prepared | None
    pair: Callable[[Any, Any], float]
    kwargs: tuple[str, ...] = ()
    min_n: int = 2


_ALL_ROWS: dict[str, AllRows] = {
    "cka_rbf": AllRows(
        lambda x, raw, name, **kw: _prep_rbf(x, name, **kw), _pair_dot, ("debiased", "sigma"), 4
    ),
    "cca": AllRows(lambda x, raw, name: _cca._prep_basis(x, rank_eps(raw), name), _cca._pair_mean_cca),
    "svcca": AllRows(
        lambda x, raw, name, keep=0.99: (
            _cca._check_keep(keep) or _cca._prep_svcca(x, rank_eps(raw), name, keep)
        ),
        lambda a, b: _cca._pair_mean_cca(a, b, "SVCCA"),
        ("keep",),
    ),
    "pwcca": AllRows(lambda x, raw, name: _cca._prep_basis(x, rank_eps(raw), name), _cca._pair_pwcca),
    "procrustes": AllRows(
        lambda x, raw, name: _geo._prep_procrustes(x, rank_eps(raw)), _geo._pair_procrustes
    ),
    "mutual_knn": AllRows(
        lambda x, raw, name, k=10, metric="cosine": _geo._prep_knn(x, k, metric),
        _geo._pair_knn,
        ("k", "metric"),
        3,
    ),
    "rsa": AllRows(
        lambda x, raw, name, metric="correlation": _geo._prep_rsa(x, metric, name),
        _geo._pair_rsa,
        ("metric",),
        3,
    ),
}

#: measure names `layer_grid` accepts (a callable measure(X, Y) -> float is accepted too)
MEASURES = ("cka", "cka_feature", *_ALL_ROWS)


def resolve_measure(
    measure: str | Callable[[Tensor, Tensor], float], kw: dict[str, Any]
) -> tuple[str, AllRows | None]:
    """The grid's name for `measure` and its all-rows recipe (None for the streamed "cka" and
    "cka_feature"); `kw` (the measure's options) is checked against what the measure takes."""
    if callable(measure):
        name = getattr(measure, "__name__", "custom")
        return name, AllRows(lambda x, raw, p: raw, lambda a, b: _custom_value(measure(a, b), name))
    if measure in ("cka", "cka_feature"):
        if kw:
            raise TypeError(f"measure {measure!r} takes no measure_kw, got {sorted(kw)}")
        return measure, None
    if measure in _ALL_ROWS:
        spec = _ALL_ROWS[measure]
        bad = sorted(set(kw) - set(spec.kwargs))
        if bad:
            raise TypeError(f"measure {measure!r} does not take {bad}; it takes {list(spec.kwargs)}")
        return measure, spec
    raise ValueError(f"unknown measure {measure!r}; choose one of {list(MEASURES)} or pass a callable")


def _custom_value(value: Any, name: str) -> float:
    """A custom measure's value for one cell: a finite number (else ValueError / TypeError)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"measure {name!r} must return a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"measure {name!r} returned {v} for a cell; a grid holds finite values only")
    return v


def pure_function(
    name: str, measure: Any, kw: dict[str, Any]
) -> tuple[Callable[[Tensor, Tensor], float], str]:
    """The pure function behind a grid measure, and the direction of "more similar"
    ("greater", or "less" for distances)."""
    if callable(measure):
        return measure, "greater"
    table: dict[str, Callable[..., float]] = {
        "cka": lambda X, Y: cka(X, Y, kernel="linear", debiased=True),
        "cka_feature": lambda X, Y: cka(X, Y, kernel="linear", debiased=False),
        "cka_rbf": lambda X, Y: cka(X, Y, kernel="rbf", **kw),
        "cca": _cca.cca_corr,
        "svcca": lambda X, Y: _cca.svcca(X, Y, **kw),
        "pwcca": _cca.pwcca,
        "procrustes": _geo.procrustes_distance,
        "mutual_knn": lambda X, Y: _geo.mutual_knn(X, Y, **kw),
        "rsa": lambda X, Y: _geo.rsa(X, Y, **kw),
    }
    return table[name], ("less" if name == "procrustes" else "greater")


def all_pairs(
    name: str,
    spec: AllRows,
    xa: dict[str, Tensor],
    xb: dict[str, Tensor],
    pa: list[str],
    pb: list[str],
    kw: dict[str, Any],
    progress: bool,
) -> Tensor:
    """Prepare each B point once, each A point in turn, and fill the [P_A, P_B] grid of `name`."""
    n = next(iter(xa.values())).shape[0]
    if n < spec.min_n:
        raise ValueError(f"measure {name!r} needs at least {spec.min_n} rows, got {n}")
    if name == "mutual_knn":
        _geo._check_knn(n, kw.get("k", 10), kw.get("metric", "cosine"))
    prep_b = {p: spec.prep(scaled64(xb[p]), xb[p], p, **kw) for p in pb}
    degenerate = [f"B:{p}" for p, v in prep_b.items() if v is None]
    out = torch.full((len(pa), len(pb)), math.nan, dtype=torch.float64)
    bar = tqdm(total=len(pa) * len(pb), desc="similarity grid", disable=not progress)
    for i, p in enumerate(pa):
        prep_a = spec.prep(scaled64(xa[p]), xa[p], p, **kw)
        if prep_a is None:
            degenerate.append(f"A:{p}")
        with warnings.catch_warnings():  # reported once per point below
            warnings.simplefilter("ignore", DegenerateInputWarning)
            for j, q in enumerate(pb):
                out[i, j] = spec.pair(prep_a, prep_b[q])
                bar.update(1)
    bar.close()
    if degenerate:
        warnings.warn(
            f"points {degenerate} have zero variance: their rows/columns hold the measure's "
            "'no shared structure' value",
            DegenerateInputWarning,
            stacklevel=3,
        )
    return out
