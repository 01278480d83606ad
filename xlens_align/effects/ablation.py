"""Ablation baselines of a mapped patch: what B gets at the patched cells instead of the mapped values.

``"zero"`` writes zeros; ``"mean"`` writes B's mean activation at the target over the cells a
mapped patch writes (the last B token of every kept aligned chunk, the same row filters) of
held-out `ablation_texts`. Without `ablation_texts` the evaluation texts are used and a
UserWarning says the mean is not held out. A tensor ``[d_B]`` is used as given (e.g. from
`mean_activation`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .. import distributed
from ..plan import plans
from ..points import Point
from ..rows import RowFilter
from ..validate import check_texts, positive_int
from .mapped import resolve

__all__ = ["ABLATIONS", "ablation_vectors", "mean_activation"]

ABLATIONS: tuple[str, ...] = ("mean", "zero")


def mean_activation(
    pair: Any,
    target: str | Point,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
) -> Float[Tensor, " d_b"]:
    """B's mean activation at `target` over the cells a mapped patch writes in `texts` (float64
    sums; returned in B's dtype on B's device). `massive` / `clamp` act on B's rows here."""
    return _mean(
        pair,
        resolve(pair.b, target, "target", "B"),
        check_texts(texts, "ablation_texts"),
        positive_int(batch_size, "batch_size"),
        RowFilter(drop_first=drop_first, massive=massive, clamp=clamp),
        {"max_length": max_length, "overflow": overflow},
        progress,
    )


def _mean(
    pair: Any,
    tgt: Point | Sequence[Point],
    texts: list[str],
    batch_size: int,
    rows: RowFilter,
    align: dict,
    progress: bool,
    arg: str = "ablation_texts",
) -> Tensor | dict[Point, Tensor]:
    """The mean at `tgt`, or {target: mean} of several targets read in one pass of B per batch
    (each target's rows filtered on their own, as in a pass of its own)."""
    tgts = [tgt] if isinstance(tgt, Point) else list(tgt)
    if not tgts:
        return {}
    b = pair.b
    total = {t: torch.zeros(b.d_model, dtype=torch.float64, device=b.device) for t in tgts}
    n = dict.fromkeys(tgts, 0)
    with torch.no_grad():
        for plan in plans(  # under an active process group: this process's shard of the texts
            pair, distributed.shard(texts, batch_size), batch_size=batch_size, rows=rows,
            progress=progress and distributed.is_main(), desc="mean ablation", **align,
        ):  # fmt: skip
            if plan.n_patched == 0:
                continue
            _, acts = b.run_with_points(plan.ids_b, plan.mask_b, tgts)
            for t in tgts:
                Y = rows.enter(plan.gather_b(acts[t]), t.name, "b", plan.meta)
                keep, _ = rows.activations([Y])
                total[t] += Y[keep].double().sum(0)
                n[t] += int(keep.sum())
    means = {}
    for t in tgts:
        tot, k = distributed.all_reduce_sum([total[t], n[t]])  # sums and counts, not means, over processes
        if k == 0:
            raise ValueError(
                f"{arg}: no aligned position is left to average for the mean ablation at {t.name!r} "
                f"(row filters {rows.describe()}); use longer texts or looser filters"
            )
        means[t] = (tot / k).to(b.dtype)
    return means[tgt] if isinstance(tgt, Point) else means


def ablation_vectors(
    pair: Any,
    targets: Sequence[Point],
    ablation: str | Tensor,
    ablation_texts: Sequence[str] | None,
    texts: list[str],
    *,
    batch_size: int,
    rows: RowFilter,
    align: dict,
    stacklevel: int = 2,
) -> tuple[dict[Point, Tensor], str]:
    """{target: [d_B] vector written by the ablation} and the ablation's name; the warning about a
    mean that is not held out points `stacklevel` frames up."""
    b = pair.b
    if isinstance(ablation, Tensor):
        if ablation.shape != (b.d_model,):
            raise ValueError(
                f"ablation: a tensor must have shape [d_model] = [{b.d_model}] of model B, got {tuple(ablation.shape)}"
            )
        vec = ablation.to(device=b.device, dtype=b.dtype)
        if not torch.isfinite(vec).all():
            raise ValueError("ablation: the tensor contains inf/NaN")
        return dict.fromkeys(targets, vec), "custom"
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS} or a [d_model] tensor, got {ablation!r}")
    if ablation == "zero":
        return {t: torch.zeros(b.d_model, dtype=b.dtype, device=b.device) for t in targets}, "zero"
    if ablation_texts is None:
        warnings.warn(
            "ablation='mean' without ablation_texts: the mean activation is taken over the evaluation "
            "texts themselves, not held-out texts; pass ablation_texts=... for a held-out baseline",
            UserWarning,
            stacklevel=stacklevel,
        )
        ablation_texts = texts
        arg = "texts (used for the mean ablation since ablation_texts is None)"
    else:
        arg = "ablation_texts"
    held = check_texts(ablation_texts, "ablation_texts")
    return _mean(pair, list(targets), held, batch_size, rows, align, False, arg), "mean"
