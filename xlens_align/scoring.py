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

`metrics` takes the logits at the scored predictions (one log-sum-exp per prediction);
`metrics_hidden` takes the rows after B's final norm and makes the logits a block of rows at a
time, scoring each block while it is in cache (the grid engine's path): the same numbers, with
``sum_v p0_v (z_v - z0_v) = q0 . (h - h0)`` (``q0 = sum_v p0_v W_v``) when the unembedding is linear.

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
from collections.abc import Callable
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
    "metrics",
    "metrics_hidden",
    "nll",
    "objective_sum",
    "recovered",
    "reference",
    "reference_hidden",
    "score",
    "scored_logits",
]

OBJECTIVES = ("ce", "kl")
"""What an adapter trained through B minimises: B's next-token cross-entropy, or KL(clean B || patched B)."""
_RECOVERED_RTOL = 1e-6
_CPU_BLOCK, _GPU_BLOCK = 1 << 21, 1 << 28  # logits per block of `metrics_hidden`
# ...and at least this many rows per block: each block re-reads the whole unembedding [V, d], so
# with a large vocabulary a cache-sized block is bound by that read (Gemma 3, V = 262,144, d = 640,
# 1,431 rows on 2 CPU cores: 33.6 s at 8 rows a block, 4.8 s at 256; SmolLM2: 1.10 vs 0.79 s)
_MIN_BLOCK_ROWS = 256


def scored_logits(
    logits: Float[Tensor, "K T V"], score_at: tuple[Tensor, Tensor], batch_rows: int, replicate: int = 0
) -> Float[Tensor, "m V"]:
    """The logits [m, V] of replicate `replicate` of a batch of `batch_rows` rows (a forward over
    K = replicates x batch_rows rows) at the scored predictions ``score_at = (rows, positions)``;
    float32 (float64 kept)."""
    rows, pos = score_at
    return _logits32(logits[replicate * batch_rows + rows, pos])


class Reference(NamedTuple):
    """The clean run at the scored predictions (the reference of KL and top-1)."""

    logits: Tensor  # [m, V]
    lse: Tensor  # [m] log-sum-exp of the logits
    p: Tensor  # [m, V] next-token probabilities
    psum: Tensor  # [m] sum of p (1 up to rounding)
    top: Tensor  # [m] argmax
    hidden: Tensor | None = None  # [m, d] the rows after the final norm (`reference_hidden`)
    q: Tensor | None = None  # [m, d] sum_v p_v W_v, with W the (linear) unembedding


def reference(clean: Float[Tensor, "m V"]) -> Reference:
    """The `Reference` of the clean run's scored logits (no gradient)."""
    clean = clean.detach()
    lse = torch.logsumexp(clean, dim=-1)
    p = (clean - lse[:, None]).exp_()
    return Reference(clean, lse, p, p.sum(-1), clean.argmax(-1))


def reference_hidden(
    hidden: Float[Tensor, "m d"], unembed: Callable[[Tensor], Tensor], weight: Tensor | None = None
) -> Reference:
    """The `Reference` of the clean run from its rows after the final norm: `unembed` gives the
    logits; `weight` [V, d], when the logits are exactly ``weight @ h``, lets `metrics_hidden`
    take the KL's dot product in d dimensions."""
    ref = reference(_logits32(unembed(hidden)))
    if weight is None:
        return ref
    return ref._replace(hidden=hidden.detach(), q=ref.p.to(weight.dtype) @ weight.detach())


def _logits32(z: Tensor) -> Tensor:
    return z if z.dtype == torch.float64 else z.float()


def nll(
    sel: Float[Tensor, "*k m V"], labels: Int[Tensor, " m"], lse: Tensor | None = None
) -> Float[Tensor, "*k m"]:
    """Cross-entropy of each label under the logits (differentiable); `lse`: the logits'
    log-sum-exp when already computed. Leading dimensions (replicates) broadcast."""
    if lse is None:
        lse = torch.logsumexp(sel, dim=-1)
    return lse - sel.gather(-1, labels.expand(sel.shape[:-1])[..., None]).squeeze(-1)


def kl_to_clean(
    sel: Float[Tensor, "*k m V"], ref: Reference, lse: Tensor | None = None
) -> Float[Tensor, "*k m"]:
    """KL(clean || variant) of each prediction (differentiable in `sel`); `lse` as in `nll`."""
    if lse is None:
        lse = torch.logsumexp(sel, dim=-1)
    return _kl(lse, torch.linalg.vecdot(sel - ref.logits, ref.p), ref.lse, ref.psum)


def _kl(lse: Tensor, dot: Tensor, lse0: Tensor, psum0: Tensor) -> Tensor:
    """KL(clean || variant) from the variant's log-sum-exp and ``dot = sum_v p0_v (z_v - z0_v)``."""
    return (lse - lse0) * psum0 - dot


def agreement(sel: Float[Tensor, "*k m V"], ref: Reference) -> Bool[Tensor, "*k m"]:
    """Whether each prediction's argmax equals the clean run's."""
    return sel.argmax(-1) == ref.top


def metrics(
    sel: Float[Tensor, "*k m V"], labels: Int[Tensor, " m"], ref: Reference
) -> tuple[Tensor, Tensor, Tensor]:
    """(`nll`, `kl_to_clean`, `agreement`) of each prediction, the log-sum-exp taken once;
    `sel` may stack k replicates' scored logits [k, m, V] (results [k, m])."""
    lse = torch.logsumexp(sel, dim=-1)
    return nll(sel, labels, lse), kl_to_clean(sel, ref, lse), agreement(sel, ref)


def metrics_hidden(
    hidden: Float[Tensor, "R d"],
    unembed: Callable[[Tensor], Tensor],
    labels: Int[Tensor, " m"],
    ref: Reference,
    block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`metrics` of R rows after the final norm (k replicates, replicate-major: row r is
    prediction ``r % m``), each [R]. The logits are made `block` rows at a time (default: about
    8 MiB of float32 logits on the CPU, so they are scored while in cache, but at least 256 rows, so
    the unembedding's weight is not re-read every few rows; 1 GiB on a GPU) and never all at once. With a `reference_hidden` that holds the unembedding's weight, the KL's
    ``sum_v p0_v (z_v - z0_v)`` is ``q0 . (h - h0)``, ``q0 = sum_v p0_v W_v`` (the same number: the
    logits are linear in h). Forward only."""
    R, m = hidden.shape[0], labels.shape[0]
    V = ref.p.shape[-1]
    if block is None:
        block = max(_MIN_BLOCK_ROWS, (_GPU_BLOCK if hidden.is_cuda else _CPU_BLOCK) // V)
    idx = torch.arange(R, device=hidden.device) % m
    dtype = ref.lse.dtype
    out_nll = torch.empty(R, dtype=dtype, device=hidden.device)
    out_kl, out_top = torch.empty_like(out_nll), torch.empty(R, dtype=torch.bool, device=hidden.device)
    for r0 in range(0, R, block):
        rows, i = slice(r0, r0 + block), idx[r0 : r0 + block]
        z = _logits32(unembed(hidden[rows]))
        label_logit = z.gather(1, labels[i][:, None]).squeeze(1)
        if ref.q is None:
            dot = torch.linalg.vecdot(z - ref.logits[i], ref.p[i])
        else:
            dot = torch.linalg.vecdot(hidden[rows] - ref.hidden[i], ref.q[i]).to(dtype)
        top = z.amax(-1)
        out_top[rows] = _is_argmax(z, ref.top[i], top)
        lse = top + z.sub_(top[:, None]).exp_().sum(-1).log_()  # z is spent: exp in place
        out_nll[rows] = lse - label_logit
        out_kl[rows] = _kl(lse, dot, ref.lse[i], ref.psum[i])
    return out_nll, out_kl, out_top


def _is_argmax(
    z: Float[Tensor, "r V"], index: Int[Tensor, " r"], top: Float[Tensor, " r"]
) -> Bool[Tensor, " r"]:
    """``z.argmax(-1) == index`` given ``top = z.amax(-1)``, from two max passes (a max with
    indices is several times slower on the CPU): `index` holds the maximum, and no other entry
    does (on a tie, the first maximum is argmax's answer)."""
    at = z.gather(1, index[:, None])
    hit = at.squeeze(1) == top
    z.scatter_(1, index[:, None], -math.inf)
    tie = hit & (z.amax(-1) == top)
    z.scatter_(1, index[:, None], at)
    if bool(tie.any()):
        hit[tie] = z[tie].argmax(-1) == index[tie]
    return hit


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
    into.add(*metrics(sel, labels, ref))


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
