"""The functional grid: effects of many mapped patches, several variants per batched forward of B.

Per batch of texts, A runs once with hooks on every source point; then B's token batch is
replicated K times along the batch dimension, one replicate per variant (the clean run, one
ablated run per target, one patched run per cell), at most `cells_per_forward` replicates per
forward, one hook per distinct target point (`plan.run_b`). All variants are scored on the same
predictions by the one scorer (`scoring`). `measure` is this engine with one cell and one variant
per forward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .. import distributed
from ..fitting import fit_maps
from ..plan import apply_map, plans, read_a, score_variants
from ..points import Point
from ..rows import RowFilter, merge_counts
from ..validate import check_texts, positive_int
from .ablation import ablation_vectors
from .intervals import TextSums, add_intervals, check_interval_args
from .mapped import check_map, is_map, map_kind, resolve
from .tables import Effect, EffectTable, make_effect, table

__all__ = ["METRICS", "PatchGrid", "grid", "grids"]

METRICS = ("recovered", "kl", "top1", "ce_patched")


@dataclass
class PatchGrid:
    """The functional heatmap: one mapped patch per (source point of A, target point of B).

    recovered / kl / top1 / ce_patched: float64 [n_sources, n_targets] (NaN where no map was
    given); ce_clean: B's clean loss (the same predictions for every cell); ce_ablated: per
    target; effects: the full `Effect` of every cell; extra: timing, forwards, row filters;
    text_sums: float64 [n_texts, 4] per-text sums (nll, kl, top1, n) of each run, keyed
    ``"clean"``, ``("ablated", target)`` and ``(source, target)`` (`effects.intervals`).
    """

    sources: list[str]
    targets: list[str]
    recovered: Float[Tensor, "s t"]
    kl: Float[Tensor, "s t"]
    top1: Float[Tensor, "s t"]
    ce_patched: Float[Tensor, "s t"]
    ce_clean: float
    ce_ablated: dict[str, float]
    effects: dict[tuple[str, str], Effect]
    n_tokens: int
    ablation: str
    model_a: str = "A"
    model_b: str = "B"
    extra: dict[str, Any] = field(default_factory=dict)
    text_sums: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def table(self, digits: int = 4) -> EffectTable:
        return table(list(self.effects.values()), digits=digits)

    def values(self, metric: str = "recovered") -> Float[Tensor, "s t"]:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return getattr(self, metric)


def _cells(
    pair: Any, maps: Any, sources: Sequence[Any] | None, targets: Sequence[Any] | None
) -> tuple[list[Point], list[Point], dict[tuple[Point, Point], Any]]:
    a, b = pair.a, pair.b
    if isinstance(maps, Mapping):
        if not maps:
            raise ValueError("maps is empty: give {(source, target): map}")
        entries = {}
        for key, m in maps.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"maps keys must be (source, target) tuples, got {key!r}")
            cell = (resolve(a, key[0], "source", "A"), resolve(b, key[1], "target", "B"))
            if cell in entries:
                raise ValueError(f"maps names the cell ({cell[0]}, {cell[1]}) twice")
            entries[cell] = m
    elif callable(maps) and not is_map(maps):
        if not sources or not targets:
            raise ValueError("with a fit function as maps, give sources=[...] and targets=[...]")
        entries = {
            (resolve(a, s, "sources", "A"), resolve(b, t, "targets", "B")): maps
            for s in sources
            for t in targets
        }
    else:
        raise TypeError(
            "maps must be a dict {(source, target): map or fit function} or a fit function "
            f"fit(X, Y) -> map, got {type(maps).__name__}"
        )
    srcs = (
        list(dict.fromkeys(resolve(a, s, "sources", "A") for s in sources))
        if sources
        else sorted({s for s, _ in entries}, key=lambda p: p.depth(a.n_layers))
    )
    tgts = (
        list(dict.fromkeys(resolve(b, t, "targets", "B") for t in targets))
        if targets
        else sorted({t for _, t in entries}, key=lambda p: p.depth(b.n_layers))
    )
    outside = [(s.name, t.name) for s, t in entries if s not in srcs or t not in tgts]
    if outside:
        raise ValueError(f"cells {outside} are outside sources x targets")
    return srcs, tgts, entries


def grid(
    pair: Any,
    maps: Mapping[tuple[str, str], Any] | Callable,
    texts: Sequence[str],
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    fit_texts: Sequence[str] | None = None,
    ablation: str | Tensor = "mean",
    ablation_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    cells_per_forward: int = 8,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
    n_boot: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> PatchGrid:
    """Effects of many mapped patches at once: the functional heatmap [sources x targets].

    maps: ``{(source, target): map}``; a value may instead be a fit function: a callable
    ``fit(X, Y) -> map`` or a map class (fit as ``cls().fit(X, Y)``), fit by
    `fitting.fit_maps` on the paired rows of `fit_texts` (then required) with the same row
    filters; `maps` itself may be one fit function used for every cell of ``sources x targets``.
    The numbers equal `measure` cell by cell. Memory: one forward holds the logits of
    ``cells_per_forward * batch_size`` rows. ``n_boot > 0``: percentile bootstrap intervals over
    texts at `level` on every cell's recovered / KL / top-1 (`effects.intervals`).
    """
    n_boot, level, seed = check_interval_args(n_boot, level, seed)
    g = run_grid(
        pair, maps, texts, sources=sources, targets=targets, fit_texts=fit_texts, ablation=ablation,
        ablation_texts=ablation_texts, batch_size=batch_size, drop_first=drop_first, massive=massive,
        clamp=clamp, cells_per_forward=cells_per_forward, max_length=max_length, overflow=overflow,
        progress=progress, stacklevel=3,
    )  # fmt: skip
    return add_intervals(g, n_boot, level, seed)


def grids(
    pair: Any,
    map_sets: Mapping[str, Mapping[tuple[str, str], Any] | Callable],
    texts: Sequence[str],
    *,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    fit_texts: Sequence[str] | None = None,
    ablation: str | Tensor = "mean",
    ablation_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    cells_per_forward: int = 8,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
    n_boot: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, PatchGrid]:
    """Several functional grids in one pass: ``{label: maps}`` (each as `grid`'s `maps`, e.g. one
    set per map kind, possibly on the same cells) -> ``{label: PatchGrid}``. The clean run of B,
    A's source rows and the ablation of every target are computed once per batch and shared by
    every set, so each grid's numbers equal a separate `grid` call (and its clean and ablated
    numbers are the same objects); bootstrap intervals use the same resampled texts for every
    set (a paired comparison)."""
    n_boot, level, seed = check_interval_args(n_boot, level, seed)
    if not isinstance(map_sets, Mapping) or not map_sets:
        got = "an empty dict" if isinstance(map_sets, Mapping) else type(map_sets).__name__
        raise ValueError(f"map_sets must be a non-empty dict {{label: maps}}, got {got}")
    out = run_grids(
        pair, map_sets, texts, sources=sources, targets=targets, fit_texts=fit_texts, ablation=ablation,
        ablation_texts=ablation_texts, batch_size=batch_size, drop_first=drop_first, massive=massive,
        clamp=clamp, cells_per_forward=cells_per_forward, max_length=max_length, overflow=overflow,
        progress=progress, stacklevel=3,
    )  # fmt: skip
    return {k: add_intervals(g, n_boot, level, seed) for k, g in out.items()}


def run_grid(pair: Any, maps: Any, texts: Sequence[str], *, stacklevel: int, **kw: Any) -> PatchGrid:
    """`grid`'s engine (also `measure`'s): `run_grids` with one set of maps (one frame more)."""
    return run_grids(pair, {None: maps}, texts, stacklevel=stacklevel + 1, **kw)[None]


def _set_entries(
    pair: Any,
    maps: Any,
    sources: Sequence[str] | None,
    targets: Sequence[str] | None,
    fit_texts: Sequence[str] | None,
    fit_kw: dict[str, Any],
    label: Any,
) -> tuple[list[Point], list[Point], dict[tuple[Point, Point], Any]]:
    """One set's sources, targets and ``{cell: fitted map}`` (fit functions fit on `fit_texts`)."""
    where = "" if label is None else f"map_sets[{label!r}]: "
    try:
        srcs, tgts, entries = _cells(pair, maps, sources, targets)
    except (TypeError, ValueError) as e:
        if label is None:  # `grid` / `measure`: the message as it is
            raise
        raise type(e)(f"{where}{e}") from None
    fns = {c: m for c, m in entries.items() if not is_map(m)}
    for c, m in fns.items():
        if not callable(m):
            raise TypeError(
                f"{where}maps[({c[0]}, {c[1]})] must be a map (with transform) or a fit function, "
                f"got {type(m).__name__}"
            )
    if fns:
        if fit_texts is None:
            raise ValueError(
                f"{where}maps given as fit functions need fit_texts=... (texts to fit them on, distinct "
                "from the evaluation texts)"
            )
        entries.update(fit_maps(pair, fns, fit_texts, **fit_kw))
    for (s, t), m in entries.items():
        check_map(pair, m, s, t)
    return srcs, tgts, entries


def run_grids(
    pair: Any,
    map_sets: Mapping[Any, Any],
    texts: Sequence[str],
    *,
    sources: Sequence[str] | None,
    targets: Sequence[str] | None,
    fit_texts: Sequence[str] | None,
    ablation: str | Tensor,
    ablation_texts: Sequence[str] | None,
    batch_size: int,
    drop_first: int,
    massive: float | None,
    clamp: float | None,
    cells_per_forward: int,
    max_length: int | tuple[int, int] | None,
    overflow: str,
    progress: bool,
    stacklevel: int,
) -> dict[Any, PatchGrid]:
    """The engine of `grid` / `grids` / `measure`; warnings about `recovered` point `stacklevel`
    frames up."""
    texts = check_texts(texts)
    batch_size = positive_int(batch_size, "batch_size")
    cells_per_forward = positive_int(cells_per_forward, "cells_per_forward")
    rows = RowFilter(drop_first=drop_first, massive=massive, clamp=clamp)
    align = {"max_length": max_length, "overflow": overflow}
    fit_kw = dict(batch_size=batch_size, rows=rows, progress=progress, **align)
    sets = {k: _set_entries(pair, m, sources, targets, fit_texts, fit_kw, k) for k, m in map_sets.items()}
    # variants' cells: (label, source, target); sources / targets in first-seen order over the sets
    cells = [(k, s, t) for k, (srcs, tgts, ent) in sets.items() for s in srcs for t in tgts if (s, t) in ent]
    used_srcs = list(dict.fromkeys(s for _, s, _ in cells))
    used_tgts = list(dict.fromkeys(t for _, _, t in cells))
    abl, abl_name = ablation_vectors(
        pair,
        used_tgts,
        ablation,
        ablation_texts,
        texts,
        batch_size=batch_size,
        rows=rows,
        align=align,
        stacklevel=stacklevel + 1,
    )
    clean = TextSums(len(texts))
    ablated = {t: TextSums(len(texts)) for t in used_tgts}
    patched = {c: TextSums(len(texts)) for c in cells}
    # under an active process group each process runs its shard of the texts (text0: its start)
    n_patched, n_forwards, filtered, text0 = 0, 0, {}, distributed.shard_range(len(texts), batch_size).start
    counts = {"forwards": 0}  # B's passes
    t0 = time.perf_counter()
    with torch.no_grad():
        for plan in plans(
            pair, distributed.shard(texts, batch_size), batch_size=batch_size, rows=rows,
            progress=progress and distributed.is_main(), desc="grid", **align,
        ):  # fmt: skip
            text0 += len(plan.batch.texts)  # texts so far: the text index of each prediction (TextSums)
            if plan.n_patched:
                X, plan = read_a(pair.a, plan, used_srcs, rows)
            merge_counts(filtered, plan.filtered)
            if plan.n_patched == 0:
                continue
            # variants: (sums, target or None, values or the cell whose mapped values to compute);
            # mapped values are computed chunk by chunk, so memory holds one chunk's worth
            at_text = (
                text0 - len(plan.batch.texts) + plan.batch.row_text.to(plan.labels.device)[plan.score_at[0]]
            )
            variants: list[tuple[TextSums, Point | None, Any]] = [(clean, None, None)]
            variants += [(ablated[t], t, abl[t].expand(plan.n_patched, -1)) for t in used_tgts]
            variants += [(patched[c], c[2], c) for c in cells]
            todo = [
                (
                    t,
                    partial(apply_map, sets[v[0]][2][v[1:]], X[v[1]], pair, *v[1:])
                    if isinstance(v, tuple)
                    else v,
                )
                for _, t, v in variants
            ]
            for js, (nll, kl, top1) in score_variants(pair.b, plan, todo, cells_per_forward, counts):
                for i, j in enumerate(js):
                    variants[j][0].add_texts(at_text, nll[i], kl[i], top1[i])
            n_patched += plan.n_patched
    n_forwards = counts["forwards"]
    if distributed.active():  # sums and counts of every process's shard, reduced once
        runs = [clean, *ablated.values(), *patched.values()]
        distributed.reduce_attrs(runs, ("nll", "kl", "top1", "n", "_table"))
        n_patched, n_forwards = distributed.all_reduce_sum([n_patched, n_forwards])
        filtered = distributed.reduce_counts(filtered)
    seconds = time.perf_counter() - t0
    out = {}
    for k, (srcs, tgts, entries) in sets.items():
        effects = {}
        for kk, s, t in cells:  # a loop, not a comprehension: recovered's warnings point at the caller
            if kk != k:
                continue
            effects[s.name, t.name] = make_effect(
                s.name, t.name, map_kind(entries[s, t]), clean, patched[k, s, t], ablated[t], n_patched=n_patched,
                ablation=abl_name, n_texts=len(texts), rows=rows, filtered=filtered, stacklevel=stacklevel + 1,
            )  # fmt: skip
        set_tgts = list(dict.fromkeys(t for kk, _, t in cells if kk == k))
        mats = {m: torch.full((len(srcs), len(tgts)), math.nan, dtype=torch.float64) for m in METRICS}
        names_s, names_t = [p.name for p in srcs], [p.name for p in tgts]
        for (s, t), e in effects.items():
            i, j = names_s.index(s), names_t.index(t)
            for m, v in zip(METRICS, (e.recovered, e.kl, e.top1_agreement, e.ce_patched), strict=True):
                mats[m][i, j] = v
        out[k] = PatchGrid(
            sources=names_s,
            targets=names_t,
            ce_clean=clean.mean("nll"),
            ce_ablated={t.name: ablated[t].mean("nll") for t in set_tgts},
            effects=effects,
            n_tokens=clean.n,
            ablation=abl_name,
            model_a=pair.a.name,
            model_b=pair.b.name,
            extra={
                "n_patched": n_patched,
                "forwards_b": n_forwards,
                "cells_per_forward": cells_per_forward,
                "seconds": seconds,
                "rows": rows.describe(),
                "filtered": filtered,
                **({} if len(sets) == 1 else {"shared_with": [x for x in sets if x != k]}),
            },
            text_sums={
                "clean": clean.per_text,
                **{("ablated", t.name): ablated[t].per_text for t in set_tgts},
                **{(s.name, t.name): patched[kk, s, t].per_text for kk, s, t in cells if kk == k},
            },
            **mats,
        )
    return out
