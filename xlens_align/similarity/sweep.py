"""Layer grids: one similarity value per (point of A, point of B) pair from streamed batches.

Measures and how they are streamed:

- "cka" (default): debiased linear minibatch CKA (`MinibatchCKA`), one pass, memory bounded by
  one minibatch of `minibatch_size` rows whatever the number of tokens.
- "cka_feature": biased linear CKA from float64 centred co-moments (`StatsGrid`), exact on all
  rows; memory ~ 8 * P_A * P_B * d_A * d_B bytes (large for wide models).
- "cka_rbf", "cca", "svcca", "pwcca", "procrustes", "mutual_knn", "rsa", or any callable
  ``measure(X, Y) -> float``: need all rows in memory. Rows are kept up to `max_rows`
  (default 4096); more rows raise a ValueError unless ``max_rows=None`` (unlimited) or
  ``subsample=True`` (a uniform reservoir sample of `max_rows` rows, seeded by `seed`).
  Each point is prepared once (SVD, Gram, kNN sets, RDM ranks) and reused for every pair.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from xlens_align.stats import StatsGrid, check_finite

from . import cca as _cca
from . import geometry as _geo
from ._util import DegenerateInputWarning, center, rank_eps, warn_degenerate, zero_variance
from .cka import _check_sigma, _double_center, _rbf_from_centred, cka_grid_from_stats, u_center
from .filters import describe, resolve_filters
from .grid import Grid
from .streaming import MinibatchCKA

__all__ = ["MEASURES", "grid_from_batches", "layer_grid"]


@dataclass(frozen=True)
class _AllRows:
    prep: Callable[..., Any]  # (x float64, raw tensor, point name, **kw) -> prepared | None
    pair: Callable[[Any, Any], float]
    kwargs: tuple[str, ...] = ()
    min_n: int = 2


def _prep_rbf(
    x: Tensor, raw: Tensor, name: str, debiased: bool = True, sigma: float | None = None
) -> Tensor | None:
    _check_sigma(sigma)
    xc = center(x)
    if zero_variance(xc, x):
        return warn_degenerate(name, "CKA", None)
    k = _rbf_from_centred(xc, sigma, name)
    k = u_center(k, inplace=True) if debiased else _double_center(k)
    nrm = torch.linalg.matrix_norm(k)
    return None if float(nrm) == 0.0 else (k / nrm).flatten()


def _pair_dot(a: Tensor | None, b: Tensor | None) -> float:
    return 0.0 if a is None or b is None else float(a @ b)


_MEASURES: dict[str, _AllRows] = {
    "cka_rbf": _AllRows(_prep_rbf, _pair_dot, ("debiased", "sigma"), 4),
    "cca": _AllRows(lambda x, raw, name: _cca._prep_basis(x, rank_eps(raw), name), _cca._pair_mean_cca),
    "svcca": _AllRows(
        lambda x, raw, name, keep=0.99: (
            _cca._check_keep(keep) or _cca._prep_svcca(x, rank_eps(raw), name, keep)
        ),
        lambda a, b: _cca._pair_mean_cca(a, b, "SVCCA"),
        ("keep",),
    ),
    "pwcca": _AllRows(lambda x, raw, name: _cca._prep_basis(x, rank_eps(raw), name), _cca._pair_pwcca),
    "procrustes": _AllRows(
        lambda x, raw, name: _geo._prep_procrustes(x, rank_eps(raw)), _geo._pair_procrustes
    ),
    "mutual_knn": _AllRows(
        lambda x, raw, name, k=10, metric="cosine": _geo._prep_knn(x, k, metric),
        _geo._pair_knn,
        ("k", "metric"),
        3,
    ),
    "rsa": _AllRows(
        lambda x, raw, name, metric="correlation": _geo._prep_rsa(x, metric, name),
        _geo._pair_rsa,
        ("metric",),
        3,
    ),
}

#: measure names `layer_grid` accepts (a callable measure(X, Y) -> float is accepted too)
MEASURES = ("cka", "cka_feature", *_MEASURES)


class _RowStore:
    """All rows per point, up to `max_rows` (error beyond, or a uniform reservoir sample)."""

    def __init__(self, max_rows: int | None, subsample: bool, seed: int, what: str) -> None:
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive int or None (unlimited), got {max_rows!r}")
        if subsample and max_rows is None:
            raise ValueError("subsample=True needs a max_rows sample size")
        self.max_rows, self.subsample, self.what = max_rows, subsample, what
        self.gen = torch.Generator().manual_seed(seed)
        self.chunks: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        self.full: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        self.seen = 0

    def add(self, a: dict[str, Tensor], b: dict[str, Tensor], n: int) -> None:
        cap = self.max_rows
        if cap is None or self.seen + n <= cap:
            self.chunks.append((a, b))
            self.seen += n
            return
        if not self.subsample:
            raise ValueError(
                f"measure {self.what!r} needs all rows in memory and more than max_rows={cap} rows "
                "arrived; pass max_rows=None (unlimited), a larger max_rows, or subsample=True "
                "(uniform sample of max_rows rows)"
            )
        if self.full is None:  # fill the reservoir
            a0, b0 = self._concat()
            take = cap - self.seen
            self.full = (
                {p: torch.cat([a0[p], t[:take]]) if a0 else t[:take].clone() for p, t in a.items()},
                {p: torch.cat([b0[p], t[:take]]) if b0 else t[:take].clone() for p, t in b.items()},
            )
            self.chunks = []
            self.seen += take
            a = {p: t[take:] for p, t in a.items()}
            b = {p: t[take:] for p, t in b.items()}
            n -= take
        # Algorithm R, vectorised: row with global index t replaces slot j ~ U{0..t} if j < cap;
        # when several rows of this batch pick one slot, the last one wins (as sequentially)
        t = self.seen + torch.arange(n, dtype=torch.float64)
        j = torch.floor(torch.rand(n, generator=self.gen, dtype=torch.float64) * (t + 1)).long()
        sel = torch.nonzero(j < cap).flatten()
        self.seen += n
        if sel.numel() == 0:
            return
        last = torch.full((cap,), -1, dtype=torch.long).scatter_reduce(0, j[sel], sel, "amax")
        slots = torch.nonzero(last >= 0).flatten()
        rows = last[slots]
        for store, new in ((self.full[0], a), (self.full[1], b)):
            for p, tens in new.items():
                store[p][slots.to(tens.device)] = tens[rows.to(tens.device)]

    def _concat(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if not self.chunks:
            return {}, {}
        keys_a, keys_b = list(self.chunks[0][0]), list(self.chunks[0][1])
        return (
            {p: torch.cat([c[0][p] for c in self.chunks]) for p in keys_a},
            {p: torch.cat([c[1][p] for c in self.chunks]) for p in keys_b},
        )

    def rows(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.full if self.full is not None else self._concat()


def _batch_dicts(batch: Any) -> tuple[Mapping[str, Tensor], Mapping[str, Tensor]]:
    if hasattr(batch, "a") and hasattr(batch, "b"):
        return batch.a, batch.b
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"each batch must have .a and .b dicts (a PairedBatch) or be a pair (a, b), got {type(batch).__name__}"
    )


def _select(acts: Mapping[str, Tensor], points: list[str], side: str) -> dict[str, Tensor]:
    missing = [p for p in points if p not in acts]
    if missing:
        raise ValueError(f"batch.{side} lacks points {missing}; it has {list(acts)[:12]}")
    out = {}
    for p in points:
        t = acts[p]
        if not isinstance(t, Tensor) or t.ndim != 2:
            raise ValueError(f"batch.{side}[{p!r}] must be a Tensor [n, d]")
        check_finite(t, f"batch.{side}[{p!r}]")
        out[p] = t
    return out


def grid_from_batches(
    batches: Iterable[Any],
    measure: str | Callable[[Tensor, Tensor], float] = "cka",
    points_a: Sequence[str] | None = None,
    points_b: Sequence[str] | None = None,
    *,
    filters: Any = ("drop_massive",),
    minibatch_size: int | None = 1024,
    max_rows: int | None = 4096,
    subsample: bool = False,
    seed: int = 0,
    measure_kw: Mapping[str, Any] | None = None,
    progress: bool = False,
    model_a: str = "A",
    model_b: str = "B",
    n_perm: int = 0,
    n_boot: int = 0,
    level: float = 0.95,
    control_rows: int = 512,
) -> Grid:
    """Compute a `Grid` from an iterable of paired batches (objects with `.a` / `.b` dicts
    point -> Tensor [n, d] with equal rows, or ``(a, b)`` tuples). See the module docstring for
    the measures; `filters` as in `resolve_filters` (default drops massive-activation rows).

    Statistical controls on request: with ``n_perm > 0`` every cell gets a permutation-null
    p-value (rows of B shuffled, `permutation_test`), with ``n_boot > 0`` a percentile bootstrap
    interval at `level` (`bootstrap_ci`). Both run the measure's pure function (for "cka" the
    debiased linear `cka`) on a seeded uniform sample of at most `control_rows` filtered rows, and
    land in ``grid.extra["p_values"]`` / ``["ci_low"]`` / ``["ci_high"]`` ([P_A][P_B] lists) with
    ``grid.extra["controls"]`` saying how they were computed. Cost: P_A * P_B * (n_perm + n_boot)
    evaluations of the measure on `control_rows` rows.
    """
    for name_, v in (("n_perm", n_perm), ("n_boot", n_boot)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name_} must be an int >= 0, got {v!r}")
    kw = dict(measure_kw or {})
    if callable(measure):
        name = getattr(measure, "__name__", "custom")
        spec = _AllRows(lambda x, raw, nm: raw, lambda a, b: float(measure(a, b)))
    elif measure in ("cka", "cka_feature"):
        name, spec = measure, None
        if kw:
            raise TypeError(f"measure {measure!r} takes no measure_kw, got {sorted(kw)}")
    elif measure in _MEASURES:
        name, spec = measure, _MEASURES[measure]
        bad = sorted(set(kw) - set(spec.kwargs))
        if bad:
            raise TypeError(f"measure {measure!r} does not take {bad}; it takes {list(spec.kwargs)}")
    else:
        raise ValueError(f"unknown measure {measure!r}; choose one of {list(MEASURES)} or pass a callable")
    filts = resolve_filters(filters)
    pa = list(points_a) if points_a is not None else None
    pb = list(points_b) if points_b is not None else None

    acc: MinibatchCKA | None = None
    stats: StatsGrid | None = None
    store: _RowStore | None = None
    if name == "cka":
        acc = MinibatchCKA(pa, pb, minibatch_size=minibatch_size)
    elif spec is not None:
        store = _RowStore(max_rows, subsample, seed, name)
    ctrl = _RowStore(control_rows, True, seed, "controls") if (n_perm or n_boot) else None
    rows_seen = rows_in = 0
    for batch in batches:
        a_raw, b_raw = _batch_dicts(batch)
        if pa is None:
            pa = list(a_raw)
        if pb is None:
            pb = list(b_raw)
        a, b = _select(a_raw, pa, "a"), _select(b_raw, pb, "b")
        ns = {t.shape[0] for t in (*a.values(), *b.values())}
        if len(ns) != 1:
            raise ValueError(f"batch tensors must all have the same number of rows, got {sorted(ns)}")
        rows_seen += ns.pop()
        for f in filts:
            a, b = f(a, b)
        n = next(iter(a.values())).shape[0]
        if n == 0:
            continue
        rows_in += n
        if ctrl is not None:
            ctrl.add(a, b, n)
        if acc is not None:
            acc.update(a, b)
        elif store is not None:
            store.add(a, b, n)
        else:
            if stats is None:
                stats = StatsGrid(pa, pb)
                need = 8 * len(pa) * len(pb) * a[pa[0]].shape[1] * b[pb[0]].shape[1]
                if need > 4 * 2**30:
                    warnings.warn(
                        f"cka_feature keeps a d_A x d_B float64 co-moment per pair: ~{need / 2**30:.1f} GiB; "
                        "measure='cka' needs far less",
                        stacklevel=2,
                    )
            stats.update(a, b)
    if pa is None or pb is None:
        raise ValueError("no batches: the source yielded nothing")
    if rows_in == 0:
        raise ValueError(f"no rows left to compare ({rows_seen} seen, all removed by filters)")

    extra: dict[str, Any] = {"filters": [describe(f) for f in filts], "rows_seen": rows_seen}
    if acc is not None:
        values = acc.compute()
        pending = acc.pending_rows if acc.pending_rows >= 4 else 0
        n_tokens = acc.n_rows + pending
        extra.update(minibatch_size=minibatch_size, n_minibatches=acc.n_minibatches + (pending > 0))
        if rows_in > n_tokens:
            extra["rows_unused"] = rows_in - n_tokens
    elif stats is not None:
        values, n_tokens = cka_grid_from_stats(stats), stats.n
    else:
        assert store is not None and spec is not None
        xa, xb = store.rows()
        n_tokens = next(iter(xa.values())).shape[0]
        if n_tokens < spec.min_n:
            raise ValueError(f"measure {name!r} needs at least {spec.min_n} rows, got {n_tokens}")
        if name == "mutual_knn":
            _geo._check_knn(n_tokens, kw.get("k", 10), kw.get("metric", "cosine"))
        values = _all_pairs(spec, xa, xb, pa, pb, kw, progress)
        extra.update(max_rows=max_rows, subsampled=store.full is not None and store.seen > n_tokens)
    if kw:
        extra["measure_kw"] = kw
    if ctrl is not None:
        extra.update(_controls(ctrl, name, measure, kw, pa, pb, n_perm, n_boot, level, seed, progress))
    return Grid(values, pa, pb, name, n_tokens, model_a=model_a, model_b=model_b, extra=extra)


def _pair_function(
    name: str, measure: Any, kw: dict[str, Any]
) -> tuple[Callable[[Tensor, Tensor], float], str]:
    """The pure function behind a grid measure, and the direction of "more similar"."""
    from .cka import cka

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


def _controls(
    ctrl: _RowStore,
    name: str,
    measure: Any,
    kw: dict[str, Any],
    pa: list[str],
    pb: list[str],
    n_perm: int,
    n_boot: int,
    level: float,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Permutation p-values and bootstrap intervals of every cell, on the sampled rows."""
    from .controls import bootstrap_ci, permutation_test

    fn, alternative = _pair_function(name, measure, kw)
    xa, xb = ctrl.rows()
    n = next(iter(xa.values())).shape[0]
    out: dict[str, Any] = {
        "controls": {
            "rows": n,
            "n_perm": n_perm,
            "n_boot": n_boot,
            "level": level,
            "seed": seed,
            "alternative": alternative,
            "function": getattr(fn, "__name__", name) if callable(measure) else name,
        }
    }
    p_values = [[math.nan] * len(pb) for _ in pa]
    lo = [[math.nan] * len(pb) for _ in pa]
    hi = [[math.nan] * len(pb) for _ in pa]
    bar = tqdm(total=len(pa) * len(pb), desc="controls", disable=not progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateInputWarning)
        for i, p in enumerate(pa):
            for j, q in enumerate(pb):
                if n_perm:
                    p_values[i][j] = permutation_test(
                        fn, xa[p], xb[q], n_perm=n_perm, seed=seed, alternative=alternative
                    )
                if n_boot:
                    lo[i][j], hi[i][j] = bootstrap_ci(fn, xa[p], xb[q], n_boot=n_boot, level=level, seed=seed)
                bar.update(1)
    bar.close()
    if n_perm:
        out["p_values"] = p_values
    if n_boot:
        out["ci_low"], out["ci_high"] = lo, hi
    return out


def _all_pairs(
    spec: _AllRows,
    xa: dict[str, Tensor],
    xb: dict[str, Tensor],
    pa: list[str],
    pb: list[str],
    kw: dict[str, Any],
    progress: bool,
) -> Tensor:
    """Prepare each B point once, each A point in turn, and fill the grid."""
    prep_b = {p: spec.prep(xb[p].to(torch.float64), xb[p], p, **kw) for p in pb}
    degenerate = [f"B:{p}" for p, v in prep_b.items() if v is None]
    out = torch.full((len(pa), len(pb)), math.nan, dtype=torch.float64)
    bar = tqdm(total=len(pa) * len(pb), desc="similarity grid", disable=not progress)
    for i, p in enumerate(pa):
        prep_a = spec.prep(xa[p].to(torch.float64), xa[p], p, **kw)
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


def _default_points(model: Any) -> list[str]:
    pts = list(model.points)
    picked = [p for p in pts if p == "embed" or p.startswith("resid_post.")]
    return picked if len(picked) > 1 else pts


def layer_grid(
    pair: Any,
    texts: Iterable[str] | None,
    measure: str | Callable[[Tensor, Tensor], float] = "cka",
    points_a: Sequence[str] | None = None,
    points_b: Sequence[str] | None = None,
    batch_size: int = 8,
    filters: Any = ("drop_massive",),
    progress: bool = True,
    *,
    source: Iterable[Any] | None = None,
    minibatch_size: int | None = 1024,
    max_rows: int | None = 4096,
    subsample: bool = False,
    seed: int = 0,
    measure_kw: Mapping[str, Any] | None = None,
    n_perm: int = 0,
    n_boot: int = 0,
    level: float = 0.95,
    control_rows: int = 512,
    **collect_kw: Any,
) -> Grid:
    """Similarity of every (point of A, point of B) pair over `texts`, as a `Grid`.

    Activations come from ``xlens_align.activations.collect(pair, texts, points_a=...,
    points_b=..., batch_size=..., progress=..., **collect_kw)`` (or from `source`, any iterable
    of batches with `.a` / `.b` dicts, which bypasses collect). Default points: "embed" and
    every "resid_post.*" of each model. measure: "cka" (default, streamed debiased minibatch
    CKA), "cka_feature", "cka_rbf", "cca", "svcca", "pwcca", "procrustes", "mutual_knn", "rsa"
    or a callable; options of the measure go in `measure_kw` (e.g. ``{"k": 20}``).
    filters: rows to drop or values to clamp before accumulation (default "drop_massive";
    ``filters=()`` for none; compare both for models with massive activations).
    n_perm / n_boot / level / control_rows: permutation p-values and bootstrap intervals per cell
    on request (see `grid_from_batches`).
    """
    pa = list(points_a) if points_a is not None else (_default_points(pair.a) if pair is not None else None)
    pb = list(points_b) if points_b is not None else (_default_points(pair.b) if pair is not None else None)
    if source is None:
        if pair is None:
            raise ValueError("pass a ModelPair (or a batch source via source=)")
        from xlens_align.activations import collect

        source = collect(
            pair, texts, points_a=pa, points_b=pb, batch_size=batch_size, progress=progress, **collect_kw
        )
    elif collect_kw:
        raise TypeError(f"source= bypasses collect; unexpected collect arguments {sorted(collect_kw)}")
    return grid_from_batches(
        source,
        measure,
        pa,
        pb,
        filters=filters,
        minibatch_size=minibatch_size,
        max_rows=max_rows,
        subsample=subsample,
        seed=seed,
        measure_kw=measure_kw,
        progress=progress,
        model_a=str(getattr(getattr(pair, "a", None), "name", "A")),
        model_b=str(getattr(getattr(pair, "b", None), "name", "B")),
        n_perm=n_perm,
        n_boot=n_boot,
        level=level,
        control_rows=control_rows,
    )
