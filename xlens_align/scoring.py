"""The one scorer of B's next-token predictions: cross-entropy, KL to clean B, top-1, recovered.

Used by `effects.measure`, `effects.grid`, the adapter trained through B (its loss and its
validation loss are these functions, with gradients on) and every table of effects. Which
predictions are scored is decided by `plan.BatchPlan` (from the first patched position on).

Per scored prediction, with ``z`` the variant's logits and ``z0`` the clean run's:

* ``nll = logsumexp(z) - z[label]`` (nats);
* ``KL(clean || variant) = sum_v p0_v (log p0_v - log p_v)
  = (lse(z) - lse(z0)) * sum(p0) - sum_v p0_v (z_v - z0_v)``, computed on logit differences so
  that close distributions lose no precision to cancellation;
* top-1 agreement: ``argmax z == argmax z0``.

Means are taken over all scored predictions of a run, the sums accumulated in float64 (`Sums`).
``recovered = (CE_ablated - CE_patched) / (CE_ablated - CE_clean)``: 1 means the patch is as good
as B's own activations, 0 as bad as the ablation. When ``|CE_ablated - CE_clean|`` is at most
``1e-6 * max(1, CE_clean)`` there is no gap to recover: `recovered` is NaN, flagged undefined, with
a note and a RuntimeWarning. When the ablation *lowers* B's loss the value is still computed but
its scale is inverted: a note and a RuntimeWarning say so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "OBJECTIVES",
    "Reference",
    "Sums",
    "agreement",
    "kl_to_clean",
    "nll",
    "objective_sum",
    "recovered",
    "reference",
    "score",
    "scored_logits",
]

OBJECTIVES = ("ce", "kl")
"""What an adapter trained through B minimises: B's next-token cross-entropy, or KL(clean B || patched B)."""
_RECOVERED_RTOL = 1e-6


def scored_logits(
    logits: Float[Tensor, "K T V"], score_at: tuple[Tensor, Tensor], batch_rows: int, replicate: int = 0
) -> Float[Tensor, "m V"]:
    """The logits [m, V] of replicate `replicate` of a batch of `batch_rows` rows (a forward over
    K = replicates x batch_rows rows) at the scored predictions ``score_at = (rows, positions)``;
    float32 (float64 kept)."""
    rows, pos = score_at
    sel = logits[replicate * batch_rows + rows, pos]
    return sel if sel.dtype == torch.float64 else sel.float()


class Reference(NamedTuple):
    """The clean run at the scored predictions (the reference of KL and top-1)."""

    logits: Tensor  # [m, V]
    lse: Tensor  # [m] log-sum-exp of the logits
    p: Tensor  # [m, V] next-token probabilities
    psum: Tensor  # [m] sum of p (1 up to rounding)
    top: Tensor  # [m] argmax


def reference(clean: Float[Tensor, "m V"]) -> Reference:
    """The `Reference` of the clean run's scored logits (no gradient)."""
    clean = clean.detach()
    lse = torch.logsumexp(clean, dim=-1)
    p = (clean - lse[:, None]).exp_()
    return Reference(clean, lse, p, p.sum(-1), clean.argmax(-1))


def nll(sel: Float[Tensor, "m V"], labels: Int[Tensor, " m"]) -> Float[Tensor, " m"]:
    """Cross-entropy of each label under the logits (differentiable)."""
    return torch.logsumexp(sel, dim=-1) - sel.gather(1, labels[:, None]).squeeze(1)


def kl_to_clean(sel: Float[Tensor, "m V"], ref: Reference) -> Float[Tensor, " m"]:
    """KL(clean || variant) of each prediction (differentiable in `sel`)."""
    lse = torch.logsumexp(sel, dim=-1)
    return (lse - ref.lse) * ref.psum - ((sel - ref.logits) * ref.p).sum(-1)


def agreement(sel: Float[Tensor, "m V"], ref: Reference) -> Bool[Tensor, " m"]:
    """Whether each prediction's argmax equals the clean run's."""
    return sel.argmax(-1) == ref.top


def objective_sum(
    objective: str, sel: Float[Tensor, "m V"], labels: Int[Tensor, " m"], ref: Reference | None
) -> Float[Tensor, ""]:
    """Sum over the scored predictions of ``"ce"`` (`nll`) or ``"kl"`` (`kl_to_clean`, needs `ref`)."""
    if objective == "ce":
        return nll(sel, labels).sum()
    if objective == "kl":
        if ref is None:
            raise ValueError("objective 'kl' needs the clean run's Reference")
        return kl_to_clean(sel, ref).sum()
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


@dataclass
class Sums:
    """float64 sums of one run's per-prediction metrics (means with `mean`)."""

    nll: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    n: int = 0

    def add(self, nll: Tensor, kl: Tensor, top1: Tensor) -> None:
        self.nll += float(nll.double().sum())
        self.kl += float(kl.double().sum())
        self.top1 += float(top1.double().sum())
        self.n += int(nll.shape[0])

    def mean(self, what: str) -> float:
        """Mean of ``"nll"``, ``"kl"`` or ``"top1"`` over the predictions added (NaN for none)."""
        return getattr(self, what) / self.n if self.n else math.nan


def score(sel: Float[Tensor, "m V"], labels: Int[Tensor, " m"], ref: Reference, into: Sums) -> None:
    """Add one run's metrics at the scored predictions (`sel` from `scored_logits`) to `into`."""
    into.add(nll(sel, labels), kl_to_clean(sel, ref), agreement(sel, ref))


def recovered(
    ce_clean: float, ce_patched: float, ce_ablated: float, target: str, stacklevel: int = 2
) -> tuple[float, bool, str]:
    """(recovered, undefined, note) of a patch at `target` (see the module doc); warnings point
    `stacklevel` frames up."""
    gap = ce_ablated - ce_clean
    tol = _RECOVERED_RTOL * max(1.0, abs(ce_clean))
    if not math.isfinite(gap) or abs(gap) <= tol:
        note = (
            f"recovered is undefined (NaN): the ablation at {target!r} does not change B's loss "
            f"(CE_ablated - CE_clean = {gap:.3g}, |gap| <= {tol:.1g}), so there is no loss gap to recover"
        )
        warnings.warn(note, RuntimeWarning, stacklevel=stacklevel)
        return math.nan, True, note
    note = ""
    if gap < 0:
        note = (
            f"the ablation at {target!r} lowers B's loss (CE_ablated - CE_clean = {gap:.3g}), so "
            f"recovered's scale is inverted and it does not measure how good the patch is: compare "
            f"CE_patched, KL and top-1 directly"
        )
        warnings.warn(note, RuntimeWarning, stacklevel=stacklevel)
    return (ce_ablated - ce_patched) / gap, False, note
