"""Training an adapter through model B's next-token loss (a stitching adapter).

The closed-form maps fit B's activations; what matters is what B *does* with the mapped
activation. `train_adapter` trains an `Adapter` (affine or MLP) from A's `source` to B's
`target` with B's own loss, the patch in place, on the same batch plan and scorer as
`effects.measure`:

1. per batch of texts, a `plan.BatchPlan` fixes the cells (read A / write B, row filters) and the
   scored predictions (from the first patched position on); A's source rows are read once
   (no grad), and B's clean target rows once (for the initial closed-form map);
2. at every step the adapter maps one batch's rows, `plan.run_b` writes them into B at `target`
   through TransformerLens hooks, and the loss is `scoring.objective_sum`: B's cross-entropy
   (``"ce"``) or KL(clean B || patched B) (``"kl"``) summed over the scored predictions;
3. A's and B's parameters are frozen (``requires_grad=False`` during training, restored
   afterwards): the only graph built runs from the patched activation through B's later layers
   into the adapter.

So the adapter's validation loss (objective ``"ce"``) is exactly `effects.measure`'s
``ce_patched`` on the same texts, map and row filters.

>>> ad = train_adapter(pair, source="resid_post.10", target="resid_post.8", texts=train,
...                    val_texts=held_out, init="affine", steps=300)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..maps import Adapter
from ..plan import BatchPlan, plans, read_a, run_b
from ..points import Point
from ..rows import RowFilter
from ..scoring import OBJECTIVES, objective_sum, reference, scored_logits
from ..validate import check_texts, positive_int
from .grid import provenance

__all__ = ["frozen", "train_adapter"]


@dataclass
class PlannedRows:
    """One training batch of an adapter: A's source rows `x` (float32, B's device) and the plan."""

    x: Tensor
    plan: BatchPlan


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of `modules` get ``requires_grad=False`` inside; the flags are restored after."""
    seen: dict[int, tuple[nn.Parameter, bool]] = {}
    for mod in modules:
        for p in mod.parameters():
            seen.setdefault(id(p), (p, p.requires_grad))
    try:
        for p, _ in seen.values():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in seen.values():
            p.requires_grad_(flag)


def _batches(
    pair: Any, texts: list[str], src: Point, tgt: Point | None, batch_size: int, rows: RowFilter, align: dict
) -> tuple[list[PlannedRows], list[Tensor]]:
    """The planned batches of `texts` and, when `tgt` is given, B's clean rows at the write cells."""
    out, ys = [], []
    b = pair.b
    with torch.no_grad():
        for plan in plans(pair, texts, batch_size=batch_size, rows=rows, **align):
            if plan.n_patched == 0:
                continue
            X, plan = read_a(pair.a, plan, [src], rows)
            if plan.n_patched == 0 or plan.n_scored == 0:
                continue
            out.append(PlannedRows(X[src].to(device=b.device, dtype=torch.float32), plan))
            if tgt is not None:
                _, acts = b.run_with_points(plan.ids_b, plan.mask_b, [tgt])
                ys.append(rows.enter(plan.gather_b(acts[tgt]), tgt.name, "b", plan.meta).float())
    return out, ys


def patched_loss(
    model: Any, target: Point, objective: str
) -> Callable[[Callable, PlannedRows], tuple[Tensor, int]]:
    """The adapter's loss: ``loss(apply, batch) -> (sum over the scored predictions, count)`` of
    `objective` with ``apply(batch.x)`` written into `model` (B) at `target`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} to train through B, got {objective!r}")

    def loss(apply: Callable[[Tensor], Tensor], batch: PlannedRows) -> tuple[Tensor, int]:
        plan = batch.plan
        ref = None
        if objective == "kl":
            with torch.no_grad():
                ref = reference(scored_logits(run_b(model, plan), plan.score_at, plan.batch_rows))
        values = apply(batch.x).to(dtype=model.dtype)
        logits = run_b(model, plan, [(target, values)])
        sel = scored_logits(logits, plan.score_at, plan.batch_rows)
        return objective_sum(objective, sel, plan.labels, ref), plan.n_scored

    return loss


def train_adapter(
    pair: Any,
    *,
    source: str,
    target: str,
    texts: Sequence[str],
    val_texts: Sequence[str] | None = None,
    base: str = "affine",
    objective: str = "ce",
    init: Any = "affine",
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 8,
    patience: int = 3,
    seed: int = 0,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
    **hyper: Any,
) -> Adapter:
    """Train an `Adapter` from A's `source` to B's `target` through B's next-token loss.

    Args:
        pair: a `ModelPair` (A's and B's weights are frozen during training and left unchanged).
        source, target, texts: as in `effects.measure` (same keyword order); `val_texts`:
            held-out texts for early stopping (None: run all steps).
        base: ``"affine"`` or ``"mlp"``; objective: ``"ce"`` or ``"kl"``; init: None (random),
            ``"affine"`` / ``"procrustes"`` (closed form fitted on the same rows), or a fitted map.
        steps, lr, patience, seed, progress: training settings; batch_size: texts per step.
        drop_first, massive, clamp, max_length, overflow: the row filters and alignment options
            of `effects.measure`; they choose the patched cells.
        **hyper: other `Adapter` hyper-parameters (``hidden``, ``depth``, ``activation``,
            ``weight_decay``, ``min_delta``, ``val_every``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} to train through B, got {objective!r}")
    texts = check_texts(texts)
    batch_size = positive_int(batch_size, "batch_size")
    rows = RowFilter(drop_first=drop_first, massive=massive, clamp=clamp)
    src, tgt = pair.a.point(source), pair.b.point(target)
    align = {"max_length": max_length, "overflow": overflow}
    bad = set(hyper) & {"batch_size", "loss", "batches", "val_batches"}
    if bad:
        raise TypeError(f"train_adapter got unexpected keyword arguments {sorted(bad)}")
    ad = Adapter(
        base=base, objective=objective, init=init, steps=steps, lr=lr, patience=patience, seed=seed,
        progress=progress, **hyper,
    )  # fmt: skip
    train, ys = _batches(pair, texts, src, tgt, batch_size, rows, align)
    if not train:
        raise ValueError(f"texts: no aligned position is left to patch (row filters {rows.describe()})")
    val = None
    if val_texts is not None:
        val, _ = _batches(pair, check_texts(val_texts, "val_texts"), src, None, batch_size, rows, align)
        if not val:
            raise ValueError(
                f"val_texts: no aligned position is left to patch (row filters {rows.describe()})"
            )
    X, Y = torch.cat([t.x for t in train]), torch.cat(ys).to(pair.b.device)
    with frozen(pair.a.bridge, pair.a.hf_model, pair.b.bridge, pair.b.hf_model):
        ad.fit(X, Y, loss=patched_loss(pair.b, tgt, objective), batches=train, val_batches=val)
    ad.bind(a=pair.a, b=pair.b, **provenance(pair, src, tgt, rows, overflow=overflow), objective=objective)
    return ad
