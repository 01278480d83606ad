"""What a steering vector does to a model, and how it compares with other vectors.

* `log_odds`: per prompt, ``log p(t+) - log p(t-)`` of the next token after the prompt, for a
  pair of target tokens (e.g. " good" / " bad");
* `next_token_ce`: per text, the mean next-token cross-entropy (`scoring.nll`) over its tokens;
* `steering_effects`: both, with and without ``alpha * vector`` added at a point (`steer`), for
  several vectors at once; the changes are per item (prompt or text), so that
  `SteeringTable` can bootstrap them (`similarity.controls.bootstrap_ci`, items resampled, the
  ratio to the reference vector resampled in pairs).

Every sum is float64; every run is a clean-vs-steered difference on the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from xlens_align.scoring import nll
from xlens_align.similarity.controls import bootstrap_ci
from xlens_align.transfer.vectors import batches, check_vector, steer
from xlens_align.validate import check_texts, positive_int

__all__ = ["SteeringTable", "interval", "log_odds", "next_token_ce", "steering_effects", "target_ids"]


def target_ids(model: Any, targets: Sequence[str]) -> tuple[int, int]:
    """The token ids of a pair of target strings; each must be exactly one token of `model`."""
    if isinstance(targets, str) or len(targets) != 2:
        raise ValueError(f"targets must be a pair of strings (positive, negative), got {targets!r}")
    ids = []
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TypeError(f"each target must be a non-empty string, got {t!r}")
        enc = model.tokenizer.encode(t, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"target {t!r} is {len(enc)} tokens for model {model.name!r} ({enc}); pick a word that "
                "is one token"
            )
        ids.append(int(enc[0]))
    if ids[0] == ids[1]:
        raise ValueError(f"targets {targets!r} are the same token for model {model.name!r}")
    return ids[0], ids[1]


def log_odds(
    model: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 8, progress: bool = False
) -> Float[Tensor, " n"]:
    """Per prompt, ``log p(targets[0]) - log p(targets[1])`` of the token after the prompt
    (float64). Inside `steer` it measures the steered model."""
    pos_id, neg_id = target_ids(model, targets)
    out = []
    for ids, mask in batches(model, check_texts(prompts, "prompts"), batch_size, progress, "log-odds"):
        with torch.no_grad():
            logits = model.forward(ids, mask)
        last = logits[torch.arange(ids.shape[0]), mask.sum(1) - 1].to(torch.float64)
        out.append((last[:, pos_id] - last[:, neg_id]).cpu())
    return torch.cat(out)


def next_token_ce(
    model: Any, texts: Sequence[str], *, batch_size: int = 8, progress: bool = False
) -> Float[Tensor, " n"]:
    """Per text, the mean next-token cross-entropy (nats) over its predictions (float64)."""
    out = []
    for ids, mask in batches(model, check_texts(texts, "texts"), batch_size, progress, "CE"):
        if (mask.sum(1) < 2).any():
            raise ValueError("every text needs at least two tokens to score a next-token prediction")
        with torch.no_grad():
            logits = model.forward(ids, mask)
        m = mask[:, 1:].bool()
        sel = logits[:, :-1][m].to(torch.float64)
        loss = torch.zeros(m.shape, dtype=torch.float64, device=sel.device)
        loss[m] = nll(sel, ids[:, 1:][m])
        out.append((loss.sum(1) / m.sum(1)).cpu())
    return torch.cat(out)


def interval(values: Tensor, n_boot: int, seed: int, ref: Tensor | None = None) -> tuple[float, float]:
    """Percentile 95% bootstrap interval of the mean of `values` over items (of ``mean(values) /
    mean(ref)`` with `ref`, items resampled in pairs); NaNs with fewer than two items."""
    if values.shape[0] < 2:
        return math.nan, math.nan
    X = values.to(torch.float64)[:, None]
    if ref is None:
        return tuple(bootstrap_ci(lambda x, y: float(x.mean()), X, X, n_boot=n_boot, seed=seed))
    Y = ref.to(torch.float64)[:, None]
    return tuple(bootstrap_ci(lambda x, y: float(x.mean() / y.mean()), X, Y, n_boot=n_boot, seed=seed))


@dataclass
class SteeringTable:
    """Per vector: its norm, the per-prompt change of log-odds and the per-text change of CE
    (steered minus clean), at `point` with strength `alpha`; `reference` names the vector the
    others are compared with (their ``fraction`` = mean change / reference's mean change)."""

    point: str
    alpha: float
    targets: tuple[str, str]
    clean_log_odds: Tensor
    clean_ce: Tensor
    norms: dict[str, float]
    d_log_odds: dict[str, Tensor]
    d_ce: dict[str, Tensor]
    reference: str | None = None
    n_boot: int = 1000
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per vector: means and 95% bootstrap intervals."""
        out = []
        ref = self.d_log_odds.get(self.reference) if self.reference else None
        for name, d in self.d_log_odds.items():
            row = {
                "vector": name,
                "norm": self.norms[name],
                "d_log_odds": float(d.mean()),
                "d_log_odds_ci": interval(d, self.n_boot, self.seed),
                "d_ce": float(self.d_ce[name].mean()),
                "d_ce_ci": interval(self.d_ce[name], self.n_boot, self.seed),
            }
            if ref is not None:
                row["fraction"] = float(d.mean() / ref.mean())
                row["fraction_ci"] = interval(d, self.n_boot, self.seed, ref=ref)
            out.append(row)
        return out

    @property
    def text(self) -> str:
        """A plain-text table (means with [low, high] 95% intervals)."""

        def ci(v: float, lo_hi: tuple[float, float]) -> str:
            return f"{v:+.3f} [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]"

        head = (
            f"steering at {self.point} x alpha={self.alpha:g}; log-odds {self.targets[0]!r} vs "
            f"{self.targets[1]!r} over {len(self.clean_log_odds)} prompts (clean mean "
            f"{float(self.clean_log_odds.mean()):+.3f}); CE over {len(self.clean_ce)} neutral texts "
            f"(clean {float(self.clean_ce.mean()):.3f})"
        )
        lines = [head, f"{'vector':<18}{'norm':>9}  {'d log-odds [95% CI]':<28}{'d CE [95% CI]':<28}"]
        if self.reference:
            lines[-1] += f"fraction of {self.reference!r} [95% CI]"
        for r in self.rows():
            line = f"{r['vector']:<18}{r['norm']:>9.3f}  {ci(r['d_log_odds'], r['d_log_odds_ci']):<28}"
            line += f"{ci(r['d_ce'], r['d_ce_ci']):<28}"
            if "fraction" in r:
                line += ci(r["fraction"], r["fraction_ci"])
            lines.append(line)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "point": self.point,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "n_prompts": len(self.clean_log_odds),
            "n_texts": len(self.clean_ce),
            "clean_log_odds": float(self.clean_log_odds.mean()),
            "clean_ce": float(self.clean_ce.mean()),
            "reference": self.reference,
            "rows": self.rows(),
            **self.extra,
        }


def steering_effects(
    model: Any,
    point: str,
    vectors: Mapping[str, Tensor],
    *,
    prompts: Sequence[str],
    targets: Sequence[str],
    neutral: Sequence[str],
    alpha: float = 1.0,
    reference: str | None = None,
    batch_size: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> SteeringTable:
    """Add ``alpha * v`` at `point` (every position) for each named vector and measure the change
    of `log_odds` on `prompts` and of `next_token_ce` on `neutral` texts against the clean model."""
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError("vectors must be a non-empty mapping name -> vector")
    if reference is not None and reference not in vectors:
        raise ValueError(f"reference {reference!r} is not one of the vectors {sorted(vectors)}")
    n_boot = positive_int(n_boot, "n_boot")
    pt = model.point(point)
    vectors = {k: check_vector(v, model.d_model, f"vectors[{k!r}]") for k, v in vectors.items()}
    kw = {"batch_size": batch_size}
    clean_lo = log_odds(model, prompts, targets, **kw)
    clean_ce = next_token_ce(model, neutral, **kw)
    d_lo, d_ce = {}, {}
    for name, v in tqdm(vectors.items(), desc="steer", unit="vector", disable=not progress):
        with steer(model, pt, v, alpha):
            d_lo[name] = log_odds(model, prompts, targets, **kw) - clean_lo
            d_ce[name] = next_token_ce(model, neutral, **kw) - clean_ce
    return SteeringTable(
        pt.name,
        float(alpha),
        (targets[0], targets[1]),
        clean_lo,
        clean_ce,
        {k: float(v.to(torch.float64).norm()) for k, v in vectors.items()},
        d_lo,
        d_ce,
        reference,
        n_boot,
        seed,
    )
