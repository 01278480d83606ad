"""Paired activations of two models over a corpus, streamed batch by batch.

`collect` aligns each batch of texts across the two tokenizers (`tokens.align`), runs each model
once with hooks only on the requested points (stopping after the deepest one), pools the
activations chunk by chunk and yields a `PairedBatch` whose ``.a[point]`` and ``.b[point]`` have
the same rows: row i of both describes the same span of text.

Position filters run before anything is fit or compared, and every dropped row is counted:

* BOS is never part of a chunk, so it is always excluded (`filtered["bos"]` counts it);
* ``drop_first=k`` drops chunks that start within the first k text tokens of a row (on either
  side), where attention sinks and massive activations live;
* ``outlier_factor=f`` drops rows whose norm at any requested point exceeds f times the median
  norm of that point in the batch (the massive-activation filter; off by default).

Activations are checked for inf/NaN as they enter: the error names the point and the rows'
text index and position. ``clamp=c`` clips values to [-c, c] instead (inf included; NaN still
raises).
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

from .stats import StatsGrid
from .tokens import AlignedBatch, RowMeta

__all__ = ["PairedBatch", "accumulate", "collect", "collect_all", "concat", "filter_rows", "massive_rows"]


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


def _check_points(model: Any, points: Sequence[str] | None, side: str) -> list[str]:
    if points is None:
        return list(model.points)
    if isinstance(points, str):
        points = [points]
    points = list(points)
    if not points:
        raise ValueError(f"points_{side} must name at least one point")
    for p in points:
        try:
            model.point(p)
        except ValueError as e:
            raise ValueError(
                f"points_{side}: model {side.upper()} ({model.name}) lacks point {p!r}: {e}"
            ) from e
    return points


def _enter(x: Tensor, point: str, side: str, meta: RowMeta, clamp: float | None) -> Tensor:
    """float32 rows, checked for inf/NaN (or clamped)."""
    x = x.float()
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(dim=1)
        nan_rows = torch.isnan(x).any(dim=1)
        if clamp is None or nan_rows.any():
            idx = torch.nonzero(nan_rows if clamp is not None else rows).flatten()[:5].cpu()
            pos = meta.pos_a if side == "a" else meta.pos_b
            where = ", ".join(f"text {int(meta.text[i])} position {int(pos[i])}" for i in idx)
            kind = "NaN" if clamp is not None else "inf/NaN"
            raise ValueError(
                f"model {side.upper()} point {point!r}: {kind} activations at {int(rows.sum())} rows ({where}). "
                "Use clamp= to clip infinities, or a higher-precision dtype."
            )
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def filter_rows(
    meta: RowMeta,
    acts: Sequence[Tensor],
    *,
    drop_first: int = 0,
    outlier_factor: float | None = None,
) -> tuple[Tensor, dict[str, int]]:
    """Boolean mask of rows to keep, and how many each filter dropped."""
    n = len(meta)
    keep = torch.ones(n, dtype=torch.bool, device=meta.row.device)
    counts: dict[str, int] = {}
    if drop_first:
        # chunk start counted from the first text token (BOS, when present, is at position 0)
        first = meta.mask(min_position=drop_first + 1)
        counts["first_k"] = int((keep & ~first).sum())
        keep &= first
    if outlier_factor is not None:
        out = massive_rows(acts, outlier_factor, among=keep)
        counts["outliers"] = int((keep & out).sum())
        keep &= ~out
    return keep, counts


def massive_rows(acts: Sequence[Tensor], factor: float, among: Tensor | None = None) -> Tensor:
    """Rows whose L2 norm in any of `acts` ([n, d] each) exceeds `factor` x that tensor's median
    row norm (over the rows in `among`, default all): the massive-activation tokens."""
    if not factor > 1:
        raise ValueError(f"the outlier factor must be > 1, got {factor!r}")
    n = acts[0].shape[0]
    device = acts[0].device
    among = torch.ones(n, dtype=torch.bool, device=device) if among is None else among.to(device)
    out = torch.zeros(n, dtype=torch.bool, device=device)
    for x in acts:
        norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).to(device)
        med = norms[among].median() if among.any() else norms.median()
        if float(med) > 0:
            out |= norms > factor * med
    return out


def collect(
    pair: Any,
    texts: Sequence[str],
    points_a: Sequence[str] | str | None = None,
    points_b: Sequence[str] | str | None = None,
    *,
    batch_size: int = 8,
    policy: str = "last",
    drop_first: int = 0,
    outlier_factor: float | None = None,
    clamp: float | None = None,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = True,
) -> Iterator[PairedBatch]:
    """Stream `PairedBatch`es of A's activations at `points_a` and B's at `points_b`.

    Each model runs once per batch, with hooks only on the requested points, and stops after the
    deepest one. Rows of ``.a`` and ``.b`` describe the same text chunk (see module docstring for
    the filters). `max_length` defaults to each model's context; texts longer than it follow
    `overflow` ("error", "truncate" or "windows"), never a silent cut.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts is empty: nothing to collect")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be a positive number or None, got {clamp!r}")
    if drop_first < 0:
        raise ValueError(f"drop_first must be >= 0, got {drop_first}")
    pts_a = _check_points(pair.a, points_a, "a")
    pts_b = _check_points(pair.b, points_b, "b")
    if max_length is None:
        max_length = (pair.a.n_ctx, pair.b.n_ctx)
    starts = range(0, len(texts), batch_size)
    for s in tqdm(starts, desc="collect", unit="batch", disable=not progress):
        chunk = list(texts[s : s + batch_size])
        ab = pair.align(chunk, policy=policy, max_length=max_length, overflow=overflow)
        meta = ab.meta(policy)
        with torch.no_grad():
            acts_a = _run(pair.a, ab, "a", pts_a)
            acts_b = _run(pair.b, ab, "b", pts_b)
        a = {p: _enter(ab.gather_side(v, "a", policy), p, "a", meta, clamp) for p, v in acts_a.items()}
        b = {p: _enter(ab.gather_side(v, "b", policy), p, "b", meta, clamp) for p, v in acts_b.items()}
        keep, counts = filter_rows(
            meta, [*a.values(), *b.values()], drop_first=drop_first, outlier_factor=outlier_factor
        )
        counts = {"bos": int((ab.bos_index_a >= 0).sum()), **counts}
        if not keep.all():
            meta = meta.select(keep)
            a = {p: v[keep] for p, v in a.items()}
            b = {p: v[keep] for p, v in b.items()}
        meta.text = meta.text + s  # index into `texts`, not into this batch
        yield PairedBatch(a=a, b=b, meta=meta, batch=ab, filtered=counts)


def _run(model: Any, ab: AlignedBatch, side: str, points: list[str]) -> dict[str, Tensor]:
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
        for k, v in pb.filtered.items():
            filtered[k] = filtered.get(k, 0) + v
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
    return concat(list(collect(pair, texts, points_a, points_b, **collect_kw)))


def accumulate(
    pair: Any,
    texts: Sequence[str],
    points_a: Sequence[str] | str | None = None,
    points_b: Sequence[str] | str | None = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    **collect_kw: Any,
) -> StatsGrid:
    """Float64 `StatsGrid` of every (point of A, point of B) pair, in one streamed pass."""
    grid: StatsGrid | None = None
    for pb in collect(pair, texts, points_a, points_b, **collect_kw):
        if grid is None:
            grid = StatsGrid(list(pb.a), list(pb.b), pairs=pairs)
        grid.update(pb.a, pb.b)
    assert grid is not None
    return grid
