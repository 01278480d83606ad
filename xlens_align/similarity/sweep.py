"""Layer grids: one similarity value per (point of A, point of B) pair, from streamed batches.

`grid_from_batches` reads any iterable of paired batches; `layer_grid` collects them from a
`ModelPair` first. The measures and their memory costs are listed in `measures`. Rows pass the
package's one row-filter vocabulary (`xlens_align.rows`, same names and defaults as `collect`):
``drop_first`` (positions, applied by `collect`), ``massive`` and ``clamp`` (activations, applied
here); the grid records the settings in ``extra["rows"]`` and the dropped rows in
``extra["filtered"]``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from xlens_align import distributed
from xlens_align.rows import RowFilter, merge_counts
from xlens_align.stats import StatsGrid
from xlens_align.validate import check_texts, nonneg_int, positive_int

from ._util import SmallSampleWarning, fixed_exponent, point_list, scaled64
from .cka import cka_grid_from_stats
from .grid import Grid
from .grid_controls import cell_controls
from .intake import Recollect, batch_dicts, column_pass, enter, filter_rows, warn_if_massive
from .measures import MEASURES, all_pairs, resolve_measure
from .rowstore import RowStore
from .streaming import MinibatchCKA
from .views import check_view
from .views import view as apply_view

__all__ = ["MEASURES", "MIN_GRID_ROWS", "grid_from_batches", "layer_grid"]


def _check_collect_kw(collect: Callable[..., Any], kw: Mapping[str, Any]) -> None:
    """TypeError naming the keywords `layer_grid` got that neither it nor `collect` takes."""
    params = inspect.signature(collect).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    own = {
        "pair",
        "texts",
        "points_a",
        "points_b",
        "batch_size",
        "drop_first",
        "clamp",
        "progress",
        "massive",
    }
    unknown = sorted(set(kw) - set(params))
    if unknown:
        passed = sorted(set(params) - own)
        raise TypeError(
            f"layer_grid got unexpected keyword arguments {unknown}; besides its own it passes {passed} to collect"
        )


def _fixed_scale(acts: dict[str, Tensor], side: str, exps: dict[tuple[str, str], int]) -> dict[str, Tensor]:
    """`acts` in float64, each point times the power of two its first batch needed (kept in `exps`):
    CKA is scale invariant and a fixed factor per point keeps the co-moments' ratios exact, while
    the sums of squares stay inside float64's range."""
    return {p: scaled64(t, fixed_exponent(exps, (side, p), t)) for p, t in acts.items()}


def _stats_grid(pa: list[str], pb: list[str], a: dict[str, Tensor], b: dict[str, Tensor]) -> StatsGrid:
    """The co-moment accumulator of "cka_feature", with a warning when it will be large."""
    need = 8 * len(pa) * len(pb) * a[pa[0]].shape[1] * b[pb[0]].shape[1]
    if need > 4 * 2**30:
        warnings.warn(
            f"cka_feature keeps a d_A x d_B float64 co-moment per pair: ~{need / 2**30:.1f} GiB; "
            "measure='cka' needs far less",
            stacklevel=3,
        )
    return StatsGrid(pa, pb)


def grid_from_batches(
    batches: Iterable[Any],
    measure: str | Callable[[Tensor, Tensor], float] = "cka",
    points_a: Sequence[str] | None = None,
    points_b: Sequence[str] | None = None,
    *,
    massive: float | None = None,
    clamp: float | None = None,
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
    view: str = "raw",
    pool: bool = False,
) -> Grid:
    """Compute a `Grid` from an iterable of paired batches (objects with `.a` / `.b` dicts
    point -> Tensor [n, d] with equal rows, such as `collect`'s `PairedBatch`es, or ``(a, b)``
    tuples). See `measures` for the measures; options of one go in `measure_kw`.

    Row filters (`rows.RowFilter`): ``massive=f`` drops the rows whose norm at any point read (of
    either model) exceeds f x that point's median row norm in the batch (5.0 catches the
    massive activations of Llama-like models); ``clamp=c`` clips values to [-c, c] (infinities
    included). Both off by default, as in `collect`; an unfiltered grid warns when a row reaches
    100x its point's median norm. ``grid.extra["rows"]`` records the settings,
    ``grid.extra["filtered"]`` the dropped rows by filter (the batches' own ``.filtered`` counts
    summed with the grid's), ``grid.extra["rows_seen"]`` the rows that arrived.

    view: what is compared (`views`): "raw" (the stream as it is), "rms" (each row over its RMS:
    what the next layer's RMSNorm reads, before its gain) or "standardized" (each dimension
    z-scored with its float64 mean / std over all the rows used). Applied to the filtered rows
    before any measure sees them; "standardized" reads `batches` twice (a first pass for the
    column statistics), so it needs a re-iterable (a list; `layer_grid` collects twice).

    Statistical controls on request: with ``n_perm > 0`` every cell gets a permutation-null
    p-value (rows of B shuffled, `permutation_test`), with ``n_boot > 0`` a percentile bootstrap
    interval at `level` (`bootstrap_ci`). Both run the measure's pure function (for "cka" the
    debiased linear `cka`) on a seeded uniform sample of at most `control_rows` filtered rows, and
    land in ``grid.extra["p_values"]`` / ``["ci_low"]`` / ``["ci_high"]`` ([P_A][P_B] lists) with
    ``grid.extra["controls"]`` saying how they were computed. Cost: P_A * P_B * (n_perm + n_boot)
    evaluations of the measure on `control_rows` rows.

    pool: under torch.distributed, `batches` are this process's share of the data: the streamed
    sums ("cka", "cka_feature") of all processes are pooled once at the end and every process gets
    the grid of all the batches (`distributed.reduce_similarity`; `layer_grid` sets it when it
    shards its texts). Measures that keep rows, the controls and "standardized" are then refused.
    """
    nonneg_int(n_perm, "n_perm")
    nonneg_int(n_boot, "n_boot")
    view = check_view(view)
    kw = dict(measure_kw or {})
    name, spec = resolve_measure(measure, kw)
    pool = bool(pool) and distributed.active()
    if pool and (spec is not None or n_perm or n_boot or view == "standardized"):
        why = "view='standardized' needs every row's column statistics first"
        why = "controls sample rows" if n_perm or n_boot else f"measure {name!r} keeps rows" if spec else why
        raise ValueError(
            f"under torch.distributed ({distributed.world_size()} processes) a grid pools streamed sums only, and "
            f"{why}: use measure 'cka' or 'cka_feature' (view 'raw' or 'rms', no n_perm / n_boot), or run "
            "it in one process"
        )
    rows = RowFilter(massive=massive, clamp=clamp)
    pa, pb = point_list(points_a, "points_a"), point_list(points_b, "points_b")
    cols = column_pass(batches, pa, pb, rows) if view == "standardized" else {}

    acc = MinibatchCKA(pa, pb, minibatch_size=minibatch_size) if name == "cka" and spec is None else None
    store = RowStore(max_rows, subsample, seed, name) if spec is not None else None
    stats: StatsGrid | None = None
    sample = RowStore(control_rows, True, seed, "controls") if (n_perm or n_boot) else None
    filtered: dict[str, int] = {}
    exps: dict[tuple[str, str], int] = {}
    widths: dict[str, int] = {}
    d_max: int | None = None
    warned: set[str] = set()
    rows_seen = rows_in = 0
    for batch in batches:
        a_raw, b_raw = batch_dicts(batch)
        pa = list(a_raw) if pa is None else pa
        pb = list(b_raw) if pb is None else pb
        a, b = enter(a_raw, pa, "a", rows.clamp, widths), enter(b_raw, pb, "b", rows.clamp, widths)
        d_max = max(t.shape[1] for t in (*a.values(), *b.values()))
        a, b, n, counts = filter_rows(a, b, rows)
        merge_counts(filtered, getattr(batch, "filtered", None) or {})
        merge_counts(filtered, counts)
        rows_seen += n
        n -= counts.get("massive", 0)
        if rows.massive is None and view != "rms":
            warn_if_massive(a, b, warned, stacklevel=3)
        if n == 0:
            continue
        if view != "raw":
            a = {p: apply_view(t, view, cols.get(("a", p))) for p, t in a.items()}
            b = {p: apply_view(t, view, cols.get(("b", p))) for p, t in b.items()}
        rows_in += n
        if sample is not None:
            sample.add(a, b, n)
        if acc is not None:
            acc.update(a, b)
        elif store is not None:
            store.add(a, b, n)
        else:
            if stats is None:
                stats = _stats_grid(pa, pb, a, b)
            stats.update(_fixed_scale(a, "a", exps), _fixed_scale(b, "b", exps))
    if pool:  # every process read its shard: pool once, the same grid everywhere
        stats, (pa, pb), filtered, (rows_seen, rows_in, d_max) = distributed.reduce_similarity(
            acc, stats, exps, (pa, pb), filtered, (rows_seen, rows_in, d_max)
        )
    if pa is None or pb is None or d_max is None:
        raise ValueError("no batches: the batches (or the texts' collect) yielded nothing")
    need = 4 if name == "cka" else (spec.min_n if spec is not None else 2)
    _check_rows(name, need, rows_in, filtered)

    extra: dict[str, Any] = {"rows": rows.describe(), "filtered": filtered, "rows_seen": rows_seen}
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
        values = all_pairs(name, spec, xa, xb, pa, pb, kw, progress)
        n_tokens = next(iter(xa.values())).shape[0]
        extra.update(max_rows=max_rows, subsampled=store.subsampled)
    _warn_few_rows(name, n_tokens, d_max)
    if kw:
        extra["measure_kw"] = kw
    if sample is not None:
        extra.update(
            cell_controls(
                sample,
                name,
                measure,
                kw,
                pa,
                pb,
                n_perm=n_perm,
                n_boot=n_boot,
                level=level,
                seed=seed,
                progress=progress,
            )
        )
    return Grid(values, pa, pb, name, n_tokens, model_a=model_a, model_b=model_b, extra=extra, view=view)


#: fewest rows a grid should rest on: debiased CKA of unrelated points scatters by about +-1.4/n
#: (+-0.05 at 32 rows, +-0.2 and often negative at 7)
MIN_GRID_ROWS = 32


def _check_rows(name: str, need: int, n: int, filtered: dict[str, int]) -> None:
    """ValueError when fewer than `need` aligned rows reached a grid of measure `name`: how many
    there are, how many the measure needs, and what the row filters took."""
    if n >= need:
        return
    total = n + sum(v for k, v in filtered.items() if k != "bos")
    why = []
    if filtered.get("drop_first"):
        why.append(f"drop_first removed {filtered['drop_first']} chunks that start near their text's start")
    if filtered.get("massive"):
        why.append(f"massive removed {filtered['massive']} rows with a norm far above the batch median")
    took = f" of {total} ({'; '.join(why)})" if why else ""
    raise ValueError(
        f"a {name!r} grid needs at least {need} aligned rows, got {n}{took}; filtered: {filtered}. "
        "Pass more or longer texts" + (", or loosen the row filters" if why else "")
    )


def _warn_few_rows(name: str, n: int, d: int) -> None:
    """SmallSampleWarning when the grid rests on too few rows for its estimator."""
    need, why = MIN_GRID_ROWS, "estimates on so few rows are dominated by noise"
    if name == "cka":
        why = f"debiased CKA of unrelated points scatters by about +-{1.4 / n:.2f} here and can be negative"
    elif name == "cka_feature" and n < d:
        need, why = d, f"biased CKA with fewer rows than the d={d} features is inflated towards 1"
    if n < need:
        warnings.warn(
            f"the {name!r} grid rests on n={n} rows; it needs at least {need} ({why}); pass more or longer texts",
            SmallSampleWarning,
            stacklevel=3,
        )


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
    *,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    progress: bool = True,
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
    view: str = "raw",
    **collect_kw: Any,
) -> Grid:
    """Similarity of every (point of A, point of B) pair over `texts`, as a `Grid`.

    Activations come from ``xlens_align.activations.collect(pair, texts, points_a=...,
    points_b=..., batch_size=..., drop_first=..., clamp=..., progress=..., **collect_kw)``
    (e.g. ``max_length``, ``overflow``), or from `source`, any iterable of batches with `.a` /
    `.b` dicts, which bypasses collect. Default points: "embed" and every "resid_post.*" of each
    model. measure: "cka" (default, streamed debiased minibatch CKA), "cka_feature", "cka_rbf",
    "cca", "svcca", "pwcca", "procrustes", "mutual_knn", "rsa" or a callable; options of the
    measure go in `measure_kw` (e.g. ``{"k": 20}``).

    Row filters, with `collect`'s names and defaults: ``drop_first`` (chunks starting within the
    first k text tokens; applied by collect), ``massive`` (factor x the median row norm, e.g. 5.0;
    None: off) and ``clamp`` (applied by `grid_from_batches`). Models with massive activations:
    compare ``massive=5.0`` with ``massive=None``. n_perm / n_boot / level / control_rows:
    per-cell controls on request (see `grid_from_batches`). view: "raw" (default), "rms" (each row
    divided by its RMS over dimensions: what the next layer's RMSNorm reads, before its gain) or
    "standardized" (each dimension z-scored over the rows used; collects twice: a first pass for
    the exact column statistics); recorded in ``grid.view`` and the figure's title.
    """
    view = check_view(view)
    rows = RowFilter(drop_first=drop_first, massive=massive, clamp=clamp)
    pa, pb = point_list(points_a, "points_a"), point_list(points_b, "points_b")
    if pair is not None:
        pa = _default_points(pair.a) if pa is None else pa
        pb = _default_points(pair.b) if pb is None else pb
    if source is None:
        if pair is None:
            raise ValueError("pass a ModelPair (or a batch source via source=)")
        from xlens_align.activations import collect

        _check_collect_kw(collect, collect_kw)
        # the names collect keys its batches by ("resid_post.-1" -> "resid_post.<n_layers - 1>")
        pa, pb = [pair.a.point(p).name for p in pa], [pair.b.point(p).name for p in pb]
        pool = distributed.active()
        if pool:  # this process's shard of the texts; grid_from_batches pools them
            texts = distributed.shard(check_texts(texts), positive_int(batch_size, "batch_size"))
            progress = progress and distributed.is_main()
        source = Recollect(
            collect,
            pair,
            texts,
            points_a=pa,
            points_b=pb,
            batch_size=batch_size,
            drop_first=rows.drop_first,
            clamp=rows.clamp,
            progress=progress,
            **collect_kw,
        )
        if view != "standardized":  # one pass: the generator itself
            source = iter(source)
        if pool and not texts:  # an empty shard: no batches, still in the pooling
            source = iter(())
    elif collect_kw or rows.drop_first:
        extra = sorted(collect_kw) + (["drop_first"] if rows.drop_first else [])
        raise TypeError(f"source= bypasses collect; unexpected collect arguments {extra}")
    else:
        pool = False  # the caller's batches, as they are
    grid = grid_from_batches(
        source,
        measure,
        pa,
        pb,
        massive=rows.massive,
        clamp=rows.clamp,
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
        view=view,
        pool=pool,
    )
    grid.extra["rows"] = rows.describe()  # drop_first included: collect applied it
    return grid
