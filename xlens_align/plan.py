"""The batch plan: where A is read, where B is written, and which of B's predictions are scored.

Every pipeline that patches B (`effects.measure`, `effects.grid`, `generate`, training an
adapter through B, the mean ablation) goes through one `BatchPlan` per aligned batch of texts:

* **read A / write B**: one cell per kept aligned chunk (policy ``"last"``): A is read at the
  chunk's last A token, B is written at the chunk's last B token, in the same batch row. Chunks
  pass the row filters of `rows.RowFilter` (``drop_first`` on positions here; ``massive`` and
  ``clamp`` on A's source rows in `read_source`).
* **which predictions count**: in each batch row let ``p0`` be the first written position. The
  predictions at positions ``t >= p0`` whose label (the token at ``t + 1``) is a real token are
  scored. Predictions before ``p0`` cannot see the patch (B is causal), so they are left out,
  together with BOS, padding and the row's last position (it has no label). Rows with no
  written position contribute nothing. The clean, patched and ablated runs, the functional
  grid's cells and an adapter's training and validation loss are all scored on these
  predictions, so their losses are on one scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .patching import forward_patched
from .points import Point
from .rows import RowFilter, merge_counts
from .scoring import Reference, metrics, metrics_hidden, reference, reference_hidden, scored_logits
from .suffix import Suffix, supported
from .tokens import AlignedBatch, RowMeta

__all__ = [
    "BatchPlan",
    "apply_map",
    "make_plan",
    "plans",
    "read_a",
    "run_b",
    "score_variants",
    "scored_predictions",
]

_HALF = (torch.float16, torch.bfloat16)
_SUFFIX = True  # False: every variant through full patched forwards (`run_b`), as a reference


def scored_predictions(
    rows_b: Int[Tensor, " n"], pos_b: Int[Tensor, " n"], mask_b: Int[Tensor, "B T"]
) -> tuple[Int[Tensor, " m"], Int[Tensor, " m"]]:
    """(row, position) of every scored prediction: from each row's first written position on,
    wherever the next token is real (see the module doc)."""
    n_rows, T = mask_b.shape
    first = torch.full((n_rows,), T, dtype=torch.long, device=mask_b.device)
    first.scatter_reduce_(0, rows_b, pos_b, reduce="amin")
    t = torch.arange(T - 1, device=mask_b.device)
    scored = (t[None, :] >= first[:, None]) & mask_b[:, 1:].bool()
    return torch.nonzero(scored, as_tuple=True)


@dataclass
class BatchPlan:
    """One aligned batch: A's read cells, B's write cells (one per kept chunk, same order) and
    B's scored predictions with their labels. Tensors live on the device of the model they index."""

    batch: AlignedBatch
    meta: RowMeta
    ids_a: Int[Tensor, "B Ta"]
    mask_a: Int[Tensor, "B Ta"]
    ids_b: Int[Tensor, "B Tb"]
    mask_b: Int[Tensor, "B Tb"]
    read_a: tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
    write_b: tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
    score_at: tuple[Int[Tensor, " m"], Int[Tensor, " m"]]
    labels: Int[Tensor, " m"]
    filtered: dict[str, int]

    @property
    def n_patched(self) -> int:
        return int(self.write_b[0].shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.labels.shape[0])

    @property
    def batch_rows(self) -> int:
        return int(self.ids_b.shape[0])

    def select(self, keep: Tensor, counts: dict[str, int] | None = None) -> BatchPlan:
        """The plan restricted to the cells in `keep` (bool mask over cells); the scored
        predictions follow the new first written positions."""
        keep_a, keep_b = keep.to(self.read_a[0].device), keep.to(self.write_b[0].device)
        write = (self.write_b[0][keep_b], self.write_b[1][keep_b])
        at = scored_predictions(*write, self.mask_b)
        return replace(
            self,
            meta=self.meta.select(keep.to(self.meta.row.device)),
            read_a=(self.read_a[0][keep_a], self.read_a[1][keep_a]),
            write_b=write,
            score_at=at,
            labels=self.ids_b[at[0], at[1] + 1],
            filtered=merge_counts(dict(self.filtered), counts or {}),
        )

    def gather_b(self, acts: Float[Tensor, "B T d"]) -> Float[Tensor, "n d"]:
        """B's rows at the write cells of activations [B, T, d]."""
        return acts[self.write_b[0], self.write_b[1]]


def make_plan(pair: Any, ab: AlignedBatch, rows: RowFilter) -> BatchPlan:
    """The plan of one aligned batch (policy ``"last"``), with `rows`' position filter applied."""
    meta = ab.meta("last")
    keep, counts = rows.positions(meta)
    meta = meta.select(keep)
    a, b = pair.a, pair.b
    ins_a, ins_b = ab.model_inputs("a"), ab.model_inputs("b")
    ids_b, mask_b = ins_b["input_ids"].to(b.device), ins_b["attention_mask"].to(b.device)
    write = (meta.row.to(b.device), meta.pos_b.to(b.device))
    at = scored_predictions(*write, mask_b)
    return BatchPlan(
        batch=ab,
        meta=meta,
        ids_a=ins_a["input_ids"].to(a.device),
        mask_a=ins_a["attention_mask"].to(a.device),
        ids_b=ids_b,
        mask_b=mask_b,
        read_a=(meta.row.to(a.device), meta.pos_a.to(a.device)),
        write_b=write,
        score_at=at,
        labels=ids_b[at[0], at[1] + 1],
        filtered={"bos": int((ab.bos_index_a >= 0).sum()), **counts},
    )


def plans(
    pair: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    rows: RowFilter,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
    desc: str = "batches",
) -> Iterator[BatchPlan]:
    """One `BatchPlan` per batch of `batch_size` texts (already validated by the caller).
    `max_length` defaults to each model's context; longer texts follow `overflow`."""
    if max_length is None:
        max_length = (pair.a.n_ctx, pair.b.n_ctx)
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        ab = pair.align(
            list(texts[s : s + batch_size]), policy="last", max_length=max_length, overflow=overflow
        )
        yield make_plan(pair, ab, rows)


# -- running a plan -------------------------------------------------------------------------------
def read_a(
    model: Any, plan: BatchPlan, points: Sequence[Point], rows: RowFilter
) -> tuple[dict[Point, Float[Tensor, "n d"]], BatchPlan]:
    """Run A once (stopping after the deepest of `points`) and read its rows at the plan's read
    cells: entered through `rows` (finite or clamped; float32 for half-precision models), then
    the ``massive`` rule over all `points` at once. Returns the rows and the plan narrowed to them."""
    _, acts = model.run_with_points(plan.ids_a, plan.mask_a, list(points))
    X = {}
    for p in points:
        x = rows.enter(acts[p][plan.read_a[0], plan.read_a[1]], p.name, "a", plan.meta)
        X[p] = x.float() if x.dtype in _HALF else x
    del acts
    keep, counts = rows.activations(list(X.values()))
    if not counts:
        return X, plan
    if keep.all():
        return X, replace(plan, filtered=merge_counts(dict(plan.filtered), counts))
    return {p: x[keep] for p, x in X.items()}, plan.select(keep, counts)


def apply_map(map: Any, X: Float[Tensor, "n d_a"], pair: Any, source: Point, target: Point) -> Tensor:
    """``map.transform(X)``, checked ([n, d_B], finite) and cast to B's dtype and device."""
    b = pair.b
    try:
        Y = map.transform(X)
    except RuntimeError as e:
        raise ValueError(
            f"map.transform failed on A's {source.name!r} rows of shape {tuple(X.shape)} "
            f"(A={pair.a.name!r}, d_model={pair.a.d_model}): {e}"
        ) from e
    if not isinstance(Y, Tensor):
        raise TypeError(f"map.transform must return a torch.Tensor, got {type(Y).__name__}")
    if Y.ndim != 2 or Y.shape[0] != X.shape[0] or Y.shape[1] != b.d_model:
        raise ValueError(
            f"map output has shape {tuple(Y.shape)} for {X.shape[0]} rows; model B ({b.name}) at "
            f"{target.name!r} needs [{X.shape[0]}, d_model={b.d_model}]"
        )
    if not torch.isfinite(Y).all():
        raise ValueError(f"map output for {source.name!r} -> {target.name!r} contains inf/NaN")
    return Y.to(device=b.device, dtype=b.dtype)


def run_b(
    model: Any, plan: BatchPlan, variants: Sequence[tuple[Point | None, Tensor | None]] = ((None, None),)
) -> Float[Tensor, "K T V"]:
    """B's logits on ``len(variants)`` replicates of the plan's batch (stacked along the batch
    dimension); replicate j gets ``variants[j] = (target, values [n_patched, d_B])`` written at
    the plan's write cells (``(None, None)``: clean), one write per distinct target point
    (`patching.forward_patched`: hooks locally, inside the trace for a remote model). Read
    replicate j's scored predictions with `scoring.scored_logits(logits, plan.score_at,
    plan.batch_rows, j)`."""
    k, B = len(variants), plan.batch_rows
    by_target: dict[Point, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    for j, (t, v) in enumerate(variants):
        if t is None:
            continue
        bi, pi, vs = by_target.setdefault(t, ([], [], []))
        bi.append(plan.write_b[0] + j * B)
        pi.append(plan.write_b[1])
        vs.append(v)
    spec = {t: (torch.cat(vs), (torch.cat(bi), torch.cat(pi))) for t, (bi, pi, vs) in by_target.items()}
    ids, mask = (plan.ids_b, plan.mask_b) if k == 1 else (plan.ids_b.repeat(k, 1), plan.mask_b.repeat(k, 1))
    return forward_patched(model, ids, mask, spec)


Value = Tensor | Callable[[], Tensor] | None
Metrics = tuple[Tensor, Tensor, Tensor]


def score_variants(
    model: Any,
    plan: BatchPlan,
    variants: Sequence[tuple[Point | None, Value]],
    per_forward: int,
    counts: dict[str, int] | None = None,
) -> Iterator[tuple[list[int], Metrics]]:
    """The scores of every variant ``(target, values)`` of the plan's batch at its scored
    predictions (``(None, None)``: clean; values [n_patched, d_B], or a function computing them,
    called when its forward runs): yields ``(indices j, (nll, kl, top1) each [k, m])`` of
    `scoring.metrics` against the clean run, at most `per_forward` variants at a time, the clean
    ones first. ``counts["forwards"]`` counts B's passes.

    Targets that `suffix.supported` handles share one clean pass of B per batch (the stream at
    every such target and after the final norm): each variant then runs only B's layers above
    its target, and the unembedding only at the scored predictions, scored block by block
    (`scoring.metrics_hidden`). Any other target (``resid_mid``, a remote model) gets
    full patched forwards (`run_b`), as do all variants when ``plan._SUFFIX`` is False (the
    reference path: the same numbers within float rounding)."""
    counts = {} if counts is None else counts
    counts.setdefault("forwards", 0)
    fast = {j for j, (t, _) in enumerate(variants) if t is not None and _SUFFIX and supported(model, t)}
    if not fast:
        yield from _full_variants(model, plan, variants, range(len(variants)), per_forward, counts, None)
        return
    sfx = Suffix(model, plan.ids_b, plan.mask_b)
    order = sorted(fast, key=lambda j: (sfx.first_layer(variants[j][0]), variants[j][0].kind == "final"))
    final = model.point("final")
    _, acts = model.run_with_points(
        plan.ids_b, plan.mask_b, list(dict.fromkeys([variants[j][0] for j in order] + [final]))
    )
    counts["forwards"] += 1
    ref = reference_hidden(acts[final][plan.score_at], sfx.unembed, sfx.linear_weight)
    clean = [j for j, (t, _) in enumerate(variants) if t is None]
    if clean:
        scores = metrics(ref.logits, plan.labels, ref)
        yield clean, tuple(x.expand(len(clean), -1) for x in scores)
    rest = [j for j, (t, _) in enumerate(variants) if t is not None and j not in fast]
    yield from _full_variants(model, plan, variants, rest, per_forward, counts, ref)
    B, n, m = plan.batch_rows, plan.n_patched, plan.n_scored
    for k0 in range(0, len(order), per_forward):
        chunk = order[k0 : k0 + per_forward]
        k = len(chunk)
        streams = []
        for t, js in _runs([(variants[j][0], j) for j in chunk]):
            h = acts[t].repeat(len(js), 1, 1)
            shift = torch.arange(len(js), device=h.device) * B
            vals = torch.cat([_values(variants[j][1]) for j in js])
            h[
                plan.write_b[0].repeat(len(js)) + shift.repeat_interleave(n), plan.write_b[1].repeat(len(js))
            ] = vals
            streams.append((t, h))
        shift = torch.arange(k, device=plan.score_at[0].device) * B
        at = (plan.score_at[0].repeat(k) + shift.repeat_interleave(m), plan.score_at[1].repeat(k))
        rows = sfx.final_rows(streams, at)
        del streams
        counts["forwards"] += 1
        yield chunk, tuple(x.view(k, m) for x in metrics_hidden(rows, sfx.unembed, plan.labels, ref))


def _runs(items: Sequence[tuple[Point, int]]) -> list[tuple[Point, list[int]]]:
    """Consecutive items with the same point, grouped: [(point, [j, ...]), ...]."""
    out: list[tuple[Point, list[int]]] = []
    for t, j in items:
        if out and out[-1][0] == t:
            out[-1][1].append(j)
        else:
            out.append((t, [j]))
    return out


def _values(v: Value) -> Tensor:
    return v() if callable(v) else v


def _full_variants(
    model: Any,
    plan: BatchPlan,
    variants: Sequence[tuple[Point | None, Value]],
    js: Sequence[int],
    per_forward: int,
    counts: dict[str, int],
    ref: Reference | None,
) -> Iterator[tuple[list[int], Metrics]]:
    """`score_variants` through full patched forwards (`run_b`), `per_forward` at a time; the
    reference is the first variant's run when `ref` is None (variants[0] is then the clean run)."""
    js = list(js)
    for k0 in range(0, len(js), per_forward):
        chunk = js[k0 : k0 + per_forward]
        logits = run_b(model, plan, [(variants[j][0], _values(variants[j][1])) for j in chunk])
        counts["forwards"] += 1
        k, (rows, pos) = len(chunk), plan.score_at
        shift = torch.arange(k, device=rows.device).repeat_interleave(plan.n_scored) * plan.batch_rows
        sel = scored_logits(logits, (rows.repeat(k) + shift, pos.repeat(k)), 0).view(k, plan.n_scored, -1)
        del logits
        if ref is None:
            ref = reference(sel[0])
        yield chunk, metrics(sel, plan.labels, ref)
