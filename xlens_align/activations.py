"""Paired activations of two models over a corpus, streamed batch by batch.

`collect` aligns each batch of texts across the two tokenizers (`tokens.align`), runs each model
once with hooks only on the requested points (stopping after the deepest one), pools the
activations chunk by chunk and yields a `PairedBatch` whose ``.a[point]`` and ``.b[point]`` have
the same rows: row i of both describes the same span of text.

Rows pass the package's one set of row filters (`rows.RowFilter`: ``drop_first``, ``massive``,
``clamp``, the same names and defaults as the maps' pipelines, the effects and the similarity
grids) before anything is fit or compared; every dropped row is counted in ``.filtered``
under the filter's name ("bos", "drop_first", "massive"). Activations are checked for inf/NaN as
they enter: the error names the point and the rows' text index and position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .points import Point
from .rows import RowFilter, merge_counts
from .stats import StatsGrid
from .tokens import AlignedBatch, RowMeta
from .validate import check_texts, positive_int

__all__ = [
    "PairedBatch",
    "accumulate",
    "collect",
    "collect_all",
    "concat",
    "require_rows",
    "resolve_points",
    "run_points",
]


@dataclass
class PairedBatch:
    """One batch of paired rows. ``a[p]`` is [n, d_A] and ``b[q]`` is [n, d_B], float32."""

    a: dict[str, Float[Tensor, "n da"]]
    b: dict[str, Float[Tensor, "n db"]]
    meta: RowMeta
    batch: AlignedBatch | None  # None for rows concatenated over several batches (`collect_all`)
    filtered: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.meta)

    def coverage(self) -> dict[str, float]:
        if self.batch is None:
            raise ValueError("coverage is per aligned batch; this PairedBatch concatenates several")
        return self.batch.coverage()


def resolve_points(model: Any, points: Sequence[str | Point] | str | Point | None, arg: str) -> list[Point]:
    """`points` of `model` as `Point` objects, parsed once (None: every point of the model).

    `arg` names the argument in errors (e.g. ``"points_a"``, ``"sources"``).
    """
    if points is None:
        return [model.point(p) for p in model.points]
    if isinstance(points, str | Point):
        points = [points]
    if not isinstance(points, Sequence) or not points:
        raise ValueError(f"{arg} must name at least one point of model {model.name!r}, got {points!r}")
    out = []
    for p in points:
        try:
            out.append(model.point(p))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{arg}: model {model.name!r} lacks point {p!r}: {e}") from e
    return list(dict.fromkeys(out))


def collect(
    pair: Any,
    texts: Sequence[str],
    points_a: Sequence[str | Point] | str | None = None,
    points_b: Sequence[str | Point] | str | None = None,
    *,
    batch_size: int = 8,
    policy: str = "last",
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = True,
) -> Iterator[PairedBatch]:
    """Stream `PairedBatch`es of A's activations at `points_a` and B's at `points_b`.

    Each model runs once per batch, with hooks only on the requested points, and stops after the
    deepest one. Rows of ``.a`` and ``.b`` describe the same text chunk. `drop_first`, `massive`
    and `clamp` are the row filters of `rows.RowFilter` (the massive-row test looks at every
    requested point of both models). `max_length` defaults to each model's context; texts longer
    than it follow `overflow` ("error", "truncate" or "windows"), never a silent cut. The dicts
    ``.a`` / ``.b`` are keyed by canonical point names (``resid_post.-1`` becomes
    ``resid_post.{L-1}``).
    """
    texts = check_texts(texts)
    batch_size = positive_int(batch_size, "batch_size")
    rows = RowFilter(drop_first=drop_first, massive=massive, clamp=clamp)
    pts_a = resolve_points(pair.a, points_a, "points_a")
    pts_b = resolve_points(pair.b, points_b, "points_b")
    if max_length is None:
        max_length = (pair.a.n_ctx, pair.b.n_ctx)
    for s in tqdm(range(0, len(texts), batch_size), desc="collect", unit="batch", disable=not progress):
        ab = pair.align(texts[s : s + batch_size], policy=policy, max_length=max_length, overflow=overflow)
        yield _paired(pair, ab, policy, pts_a, pts_b, rows, s)


def _paired(
    pair: Any,
    ab: AlignedBatch,
    policy: str,
    pts_a: list[Point],
    pts_b: list[Point],
    rows: RowFilter,
    offset: int,
) -> PairedBatch:
    """One aligned batch's filtered, paired rows (`offset`: index of the batch's first text)."""
    meta = ab.meta(policy)
    counts = {"bos": int((ab.bos_index_a >= 0).sum())}
    keep, c = rows.positions(meta)
    merge_counts(counts, c)
    with torch.no_grad():
        acts_a = run_points(pair.a, ab, "a", pts_a)
        acts_b = run_points(pair.b, ab, "b", pts_b)
    a = {p.name: rows.enter(ab.gather_side(acts_a[p], "a", policy), p.name, "a", meta) for p in pts_a}
    b = {p.name: rows.enter(ab.gather_side(acts_b[p], "b", policy), p.name, "b", meta) for p in pts_b}
    keep, c = rows.activations([*a.values(), *b.values()], among=keep)
    merge_counts(counts, c)
    if not keep.all():  # keep lives on the activations' device; meta on the batch's (CPU)
        meta = meta.select(keep.to(meta.row.device))
        a = {p: v[keep.to(v.device)] for p, v in a.items()}
        b = {p: v[keep.to(v.device)] for p, v in b.items()}
    meta.text = meta.text + offset  # index into the caller's `texts`, not into this batch
    return PairedBatch(a=a, b=b, meta=meta, batch=ab, filtered=counts)


def run_points(model: Any, ab: AlignedBatch, side: str, points: list[Point]) -> dict[Point, Tensor]:
    """One forward of `model` on `side`'s tokens of `ab`, capturing `points` ([B, T, d] each)."""
    inputs = ab.model_inputs(side)
    ids = inputs["input_ids"].to(model.device)
    mask = inputs["attention_mask"].to(model.device)
    _, acts = model.run_with_points(ids, mask, points)
    return acts


def concat(parts: Iterable[PairedBatch]) -> PairedBatch:
    """Concatenate paired batches into one (rows in order; filter counts summed).

    `parts` may be any iterable, `collect`'s generator included: it is read once.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to concatenate: no paired batches")
    meta = RowMeta(
        **{f.name: torch.cat([getattr(pb.meta, f.name) for pb in parts]) for f in dataclasses.fields(RowMeta)}
    )
    filtered: dict[str, int] = {}
    for pb in parts:
        merge_counts(filtered, pb.filtered)
    return PairedBatch(
        a={p: torch.cat([pb.a[p] for pb in parts]) for p in parts[0].a},
        b={p: torch.cat([pb.b[p] for pb in parts]) for p in parts[0].b},
        meta=meta,
        batch=None,
        filtered=filtered,
    )


def collect_all(
    pair: Any,
    texts: Sequence[str],
    points_a: Sequence[str] | str | None = None,
    points_b: Sequence[str] | str | None = None,
    **collect_kw: Any,
) -> PairedBatch:
    """All of `collect`'s rows in one `PairedBatch` (see `concat`).

    Holds every row in memory: for maps that need raw pairs (MLP, adapters) and small corpora.
    Streaming consumers (statistics, minibatch CKA) should iterate `collect` instead.
    """
    out = concat(list(collect(pair, texts, points_a, points_b, **collect_kw)))
    require_rows(out.n, out.filtered, collect_kw, len(texts), "collect_all")
    return out


def accumulate(
    pair: Any,
    texts: Sequence[str],
    points_a: Sequence[str] | str | None = None,
    points_b: Sequence[str] | str | None = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    **collect_kw: Any,
) -> StatsGrid:
    """Float64 `StatsGrid` of every (point of A, point of B) pair, in one streamed pass. Under an
    active process group each process reads its `distributed.shard` of `texts` and the statistics
    are pooled once at the end (`distributed.reduce_grid`): every process gets the same grid."""
    grid: StatsGrid | None = None
    filtered: dict[str, int] = {}
    mine = distributed.shard(check_texts(texts), positive_int(collect_kw.get("batch_size", 8), "batch_size"))
    kw = {**collect_kw, "progress": collect_kw.get("progress", True) and distributed.is_main()}
    for pb in collect(pair, mine, points_a, points_b, **kw) if mine else ():
        if grid is None:
            grid = StatsGrid(list(pb.a), list(pb.b), pairs=pairs)
        grid.update(pb.a, pb.b)
        merge_counts(filtered, pb.filtered)
    if distributed.active():
        if grid is None:  # this process's shard is empty
            names = [[p.name for p in resolve_points(m, pts, arg)] for m, pts, arg in ((pair.a, points_a, "points_a"), (pair.b, points_b, "points_b"))]  # fmt: skip
            grid = StatsGrid(*names, pairs=pairs)
        grid, filtered = distributed.reduce_grid(grid), distributed.reduce_counts(filtered)
    assert grid is not None
    require_rows(grid.n, filtered, collect_kw, len(texts), "accumulate")
    return grid


def require_rows(n: int, filtered: dict[str, int], settings: dict[str, Any], n_texts: int, what: str) -> None:
    """Raise a ValueError saying why no rows are left when `n` is 0: the row filter settings (from
    `settings`, collect's keywords), the `filtered` counts and what to change."""
    if n:
        return
    rows = RowFilter.of(**{k: v for k, v in settings.items() if k in ("drop_first", "massive", "clamp")})
    dropped = sum(v for k, v in filtered.items() if k != "bos")
    hints = []
    if filtered.get("drop_first"):
        hints.append(
            f"drop_first={rows.drop_first} drops every chunk that starts within the first {rows.drop_first} "
            "tokens of its text: lower it or pass longer texts"
        )
    if filtered.get("massive"):
        hints.append(
            f"massive={rows.massive} drops rows whose norm exceeds {rows.massive} x the batch median: "
            "raise it or pass massive=None"
        )
    if not dropped:
        hints.append("the texts gave no aligned chunks (each chunk needs at least one token on both sides)")
    raise ValueError(
        f"{what}: no rows left from {n_texts} text(s): the row filters ({rows.describe()}) dropped all "
        f"{dropped} aligned rows (filtered: {filtered}); " + "; ".join(hints)
    )
