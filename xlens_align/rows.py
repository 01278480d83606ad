"""One vocabulary of row filters, shared by `collect`, the maps' pipelines, the similarity grids
and the effects of a patch, with the same defaults everywhere.

A *row* is one aligned chunk of text (its last token on each side, see `tokens`). Before anything
is fit, compared or patched, rows pass these filters, and every dropped row is counted under the
filter's name:

* ``bos``: BOS is never part of a chunk, so it is always excluded (counted, not optional);
* ``drop_first=k``: drop chunks that start within the first k text tokens of a row, on either
  side (attention sinks and massive activations live there). Default 0;
* ``massive=f``: drop rows whose L2 norm at any of the points read exceeds f times the median
  row norm of that point in the batch (the massive-activation tokens of Llama-like models: a few
  dimensions reach 1e3-1e5 and dominate linear CKA and least squares). Default None (off);
  5.0 catches SmolLM2's and Llama's massive rows;
* ``clamp=c``: clip activation values to [-c, c] as they enter (inf included; NaN still raises).
  Default None (off: inf/NaN raise, naming the point, text and position).

`RowFilter` holds the three settings; `RowFilter.describe()` is what results and map provenance
record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .tokens import RowMeta
from .validate import nonneg_int, optional_positive_float

__all__ = ["RowFilter", "massive_rows", "merge_counts"]


def massive_rows(
    acts: Sequence[Float[Tensor, "n d"]], factor: float, among: Bool[Tensor, " n"] | None = None
) -> Bool[Tensor, " n"]:
    """Rows whose L2 norm in any of `acts` ([n, d] each) exceeds `factor` x that tensor's median
    row norm (over the rows in `among`, default all): the massive-activation tokens."""
    if not factor > 1:
        raise ValueError(f"massive must be a factor > 1 (x the median row norm), got {factor!r}")
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


@dataclass(frozen=True)
class RowFilter:
    """Which aligned rows count (see the module doc). Build with keywords; checked on creation."""

    drop_first: int = 0
    massive: float | None = None
    clamp: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop_first", nonneg_int(self.drop_first, "drop_first"))
        m = optional_positive_float(self.massive, "massive")
        if m is not None and m <= 1:
            raise ValueError(f"massive must be None or a factor > 1 (x the median row norm), got {m!r}")
        object.__setattr__(self, "massive", m)
        object.__setattr__(self, "clamp", optional_positive_float(self.clamp, "clamp"))

    @classmethod
    def of(cls, value: Any = None, **kw: Any) -> RowFilter:
        """A `RowFilter` from an existing one, a dict of settings, or keywords (None: the defaults)."""
        if isinstance(value, RowFilter):
            if kw:
                raise TypeError(f"give either a RowFilter or the settings {sorted(kw)}, not both")
            return value
        if isinstance(value, dict):
            kw = {**value, **kw}
        elif value is not None:
            raise TypeError(f"rows must be a RowFilter or a dict of its settings, got {type(value).__name__}")
        unknown = set(kw) - {"drop_first", "massive", "clamp"}
        if unknown:
            raise TypeError(
                f"unknown row filter settings {sorted(unknown)}; valid: drop_first, massive, clamp"
            )
        return cls(**{k: v for k, v in kw.items() if v is not None or k != "drop_first"})

    # -- filters on positions (known before any model runs) -------------------------------------
    def positions(self, meta: RowMeta) -> tuple[Bool[Tensor, " n"], dict[str, int]]:
        """Rows kept by the position filter (``drop_first``) and how many it dropped."""
        keep = torch.ones(len(meta), dtype=torch.bool, device=meta.row.device)
        counts: dict[str, int] = {}
        if self.drop_first:
            # chunk start counted from the first text token (BOS, when present, is at position 0)
            keep = meta.mask(min_position=self.drop_first + 1)
            counts["drop_first"] = int((~keep).sum())
        return keep, counts

    # -- filters on activations ----------------------------------------------------------------
    def enter(self, x: Tensor, point: str, side: str, meta: RowMeta) -> Float[Tensor, "n d"]:
        """Rows of activations entering the pipeline: float32 (float64 kept), checked for inf/NaN
        (with ``clamp``: infinities clipped, NaN still raises), clipped to [-clamp, clamp]."""
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        bad = ~torch.isfinite(x)
        if bad.any():
            nan_rows = torch.isnan(x).any(dim=1)
            if self.clamp is None or nan_rows.any():
                rows = nan_rows if self.clamp is not None else bad.any(dim=1)
                idx = torch.nonzero(rows).flatten()[:5].cpu()
                pos = meta.pos_a if side == "a" else meta.pos_b
                where = ", ".join(f"text {int(meta.text[i])} position {int(pos[i])}" for i in idx)
                kind = "NaN" if self.clamp is not None else "inf/NaN"
                raise ValueError(
                    f"model {side.upper()} point {point!r}: {kind} activations at {int(rows.sum())} rows "
                    f"({where}). Use clamp= to clip infinities, or a higher-precision dtype."
                )
        if self.clamp is not None:
            x = x.clamp(-self.clamp, self.clamp)
        return x

    def activations(
        self, acts: Sequence[Tensor], among: Bool[Tensor, " n"] | None = None
    ) -> tuple[Bool[Tensor, " n"], dict[str, int]]:
        """Rows kept by the activation filter (``massive``) among the rows `among`, and the count
        it dropped; `acts` are the rows of every point read ([n, d] each)."""
        n = acts[0].shape[0] if acts else 0
        device = acts[0].device if acts else torch.device("cpu")
        keep = torch.ones(n, dtype=torch.bool, device=device) if among is None else among.to(device).clone()
        if self.massive is None or not acts:
            return keep, {}
        out = massive_rows(acts, self.massive, among=keep)
        counts = {"massive": int((keep & out).sum())}
        return keep & ~out, counts

    def describe(self) -> dict[str, Any]:
        """The settings as JSON values (for results and map provenance); BOS is always excluded."""
        return {
            "bos": "excluded",
            "drop_first": self.drop_first,
            "massive": self.massive,
            "clamp": self.clamp,
        }


def merge_counts(into: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    """Add filter counts to `into` (in place); returns it."""
    for k, v in counts.items():
        into[k] = into.get(k, 0) + int(v)
    return into
