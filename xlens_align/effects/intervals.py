"""Percentile bootstrap intervals over texts for the effects of mapped patches.

The engine (`effects.grid.run_grid`) keeps, next to each run's `scoring.Sums`, the same float64
sums per text (`TextSums`: nll, kl, top1 and the number of scored predictions of every evaluation
text). A bootstrap replicate draws the texts with replacement (a seeded
``torch.Generator``), adds their sums and recomputes the effect's numbers exactly as the point
estimate does: mean CE of the clean, patched and ablated runs, ``recovered = (CE_ablated -
CE_patched) / (CE_ablated - CE_clean)``, mean KL and top-1 agreement. The three runs of one
effect are resampled with the same texts (they are paired), and every effect of one grid uses the
same draws for one seed. The ablation's mean vector (``ablation="mean"``) is held fixed: it
comes from `ablation_texts`, not from the texts resampled here.

>>> eff = xa.effects.measure(pair, m, source=..., target=..., texts=held_out, n_boot=1000)
>>> eff.recovered, eff.recovered_ci      # 0.91, (0.88, 0.93)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..files import check_seed
from ..scoring import Reference, Sums, agreement, kl_to_clean, nll
from ..validate import nonneg_int

__all__ = [
    "TextSums",
    "add_intervals",
    "bootstrap_effect",
    "check_interval_args",
    "resample_weights",
    "score_texts",
]

_NLL, _KL, _TOP1, _N = range(4)


class TextSums(Sums):
    """`Sums` of one run that also keep the sums of each text: ``table[i] = (nll, kl, top1, n)``
    of text i (float64, on the device of the scored logits until `per_text` is read)."""

    def __init__(self, n_texts: int) -> None:
        super().__init__()
        self.n_texts = int(n_texts)
        self._table: Tensor | None = None

    def add_texts(self, text: Tensor, nll: Tensor, kl: Tensor, top1: Tensor) -> None:
        """Add per-prediction metrics; ``text[k]`` is the text index of prediction k."""
        self.add(nll, kl, top1)
        vals = torch.stack(
            [nll.double(), kl.double(), top1.double(), torch.ones_like(nll, dtype=torch.float64)], 1
        )
        if self._table is None:
            self._table = torch.zeros(self.n_texts, 4, dtype=torch.float64, device=vals.device)
        self._table.index_add_(0, text.to(vals.device), vals.detach())

    @property
    def per_text(self) -> Float[Tensor, "t 4"]:
        """float64 [n_texts, 4] on the CPU: (nll, kl, top1, n) summed per text."""
        if self._table is None:
            return torch.zeros(self.n_texts, 4, dtype=torch.float64)
        return self._table.cpu()


def score_texts(
    sel: Float[Tensor, "m V"], labels: Tensor, ref: Reference, into: TextSums, text: Tensor
) -> None:
    """`scoring.score` that also records each prediction's text (the one scorer's functions)."""
    into.add_texts(text, nll(sel, labels), kl_to_clean(sel, ref), agreement(sel, ref))


def check_interval_args(n_boot: Any, level: Any, seed: Any) -> tuple[int, float, int]:
    """(n_boot, level, seed) checked: n_boot an int >= 0 (0: no intervals), level in (0, 1)."""
    n_boot = nonneg_int(n_boot, "n_boot")
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0.0 < float(level) < 1.0:
        raise ValueError(
            f"level must be a number in (0, 1) (the interval's coverage, e.g. 0.95), got {level!r}"
        )
    return n_boot, float(level), check_seed(seed)


def resample_weights(n_texts: int, n_boot: int, seed: int) -> Float[Tensor, "b t"]:
    """float64 [n_boot, n_texts]: how many times each text is drawn in each replicate (texts
    drawn uniformly with replacement, `n_texts` per replicate, from ``torch.Generator(seed)``)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n_texts, (n_boot, n_texts), generator=gen)
    w = torch.zeros(n_boot, n_texts, dtype=torch.float64)
    return w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def _interval(reps: Tensor, level: float) -> tuple[float, float] | None:
    ok = reps[torch.isfinite(reps)]
    if ok.numel() == 0:
        return None
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(ok, q).tolist()
    return float(lo), float(hi)


def bootstrap_effect(
    clean: Float[Tensor, "t 4"],
    patched: Float[Tensor, "t 4"],
    ablated: Float[Tensor, "t 4"],
    weights: Float[Tensor, "b t"],
    level: float,
    *,
    recovered_defined: bool = True,
) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals of recovered / KL / top-1 from per-text tables (`TextSums.per_text`)
    and resampling `weights` (`resample_weights`). Replicates where a number is undefined (no
    scored prediction drawn, or no loss gap) are left out; None when none is left, and for
    `recovered` when the point estimate is undefined."""
    c, p, a = weights @ clean, weights @ patched, weights @ ablated  # [b, 4] sums per replicate
    n = p[:, _N]
    with torch.no_grad():
        ce_c, ce_p, ce_a = c[:, _NLL] / n, p[:, _NLL] / n, a[:, _NLL] / n
        gap = ce_a - ce_c
        rec = torch.where(gap.abs() > 0, (ce_a - ce_p) / gap, torch.full_like(gap, math.nan))
    return {
        "recovered_ci": _interval(rec, level) if recovered_defined else None,
        "kl_ci": _interval(p[:, _KL] / n, level),
        "top1_ci": _interval(p[:, _TOP1] / n, level),
    }


def add_intervals(g: Any, n_boot: int, level: float, seed: int) -> Any:
    """Set ``recovered_ci`` / ``kl_ci`` / ``top1_ci`` (and ``n_boot``, ``ci_level``) on every
    `Effect` of the `PatchGrid` `g` from its per-text sums; n_boot == 0 leaves them None.
    Every cell uses the same resampled texts. Returns `g`."""
    if n_boot == 0:
        return g
    clean = g.text_sums["clean"]
    weights = resample_weights(clean.shape[0], n_boot, seed)
    for (s, t), e in g.effects.items():
        cis = bootstrap_effect(
            clean,
            g.text_sums[s, t],
            g.text_sums["ablated", t],
            weights,
            level,
            recovered_defined=not e.recovered_undefined,
        )
        for k, v in cis.items():
            setattr(e, k, v)
        e.n_boot, e.ci_level = n_boot, level
    g.extra["bootstrap"] = {"n_boot": n_boot, "level": level, "seed": seed, "over": "texts"}
    return g
