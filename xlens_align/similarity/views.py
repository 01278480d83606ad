"""What a similarity grid compares: the raw residual stream, or the stream as the next layer reads it.

Three views of a point's rows ``x [n, d]``, applied where rows enter a grid (after the row
filters), so every measure sees the same rows:

* ``"raw"``: the residual stream as it is. A few *massive* dimensions (values of 1e2-1e4 on
  some tokens) can dominate linear CKA, Procrustes and CCA.
* ``"rms"``: each row divided by its root-mean-square over dimensions, ``x / sqrt(mean_j x_j^2)``:
  what an RMSNorm hands the next layer, before its learned gain (Llama, Mistral, Gemma and
  SmolLM2 all read the stream through one). Invariant to scaling each row.
* ``"standardized"``: each dimension z-scored, ``(x_j - mean_j) / std_j``, with the mean and
  (population) standard deviation of that dimension over all rows the grid uses (float64,
  exact: a first pass over the rows, `ColumnStats`). Invariant to scaling each dimension; a
  dimension that is constant over the rows becomes 0.

`view` is the pure function; `layer_grid(..., view=...)` / `grid_from_batches(..., view=...)`
apply it and record it in ``Grid.view`` and the figure's title.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["VIEWS", "VIEW_LABELS", "ColumnStats", "check_view", "view"]

#: the views, each with the words that name it in titles and reports
VIEW_LABELS = {
    "raw": "raw residual stream",
    "rms": "RMS-normalised stream (what the next layer's norm reads, before its gain)",
    "standardized": "standardized dimensions (z-scored over the rows used)",
}
VIEWS = tuple(VIEW_LABELS)


def check_view(view: object) -> str:
    """`view` when it is one of `VIEWS`, else a ValueError naming the argument."""
    if not isinstance(view, str) or view not in VIEW_LABELS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return view


class ColumnStats:
    """float64 count, mean and centred sum of squares of each dimension of a stream of rows
    (batches merged with Chan et al.'s pairwise update, so the mean does not cancel the variance)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Float[Tensor, "n d"]) -> ColumnStats:
        if x.shape[0] == 0:
            return self
        x = x.to(torch.float64)
        n_b, mean_b = x.shape[0], x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return self
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"rows have {x.shape[1]} dimensions, earlier rows had {self.mean.shape[0]}")
        n = self.n + n_b
        delta = mean_b.to(self.mean.device) - self.mean
        self.m2 = self.m2 + m2_b.to(self.m2.device) + delta**2 * (self.n * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n
        return self

    @property
    def std(self) -> Float[Tensor, " d"]:
        """Population standard deviation of each dimension (ValueError before any row)."""
        if self.m2 is None or self.n == 0:
            raise ValueError("ColumnStats has seen no rows")
        return (self.m2 / self.n).sqrt()


def view(
    x: Float[Tensor, "n d"], kind: str = "raw", stats: ColumnStats | None = None
) -> Float[Tensor, "n d"]:
    """Rows `x` under the view `kind` (see the module doc). "standardized" needs the column
    statistics of all rows (`stats`; default: those of `x` itself). Computed in float64; returned
    in float64 for float64 input, else float32 (the viewed values are O(1): no half-precision
    range issue). An all-zero row stays zero under "rms"."""
    kind = check_view(kind)
    if kind == "raw":
        return x
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x64 = x.to(torch.float64)
    if kind == "rms":
        rms = x64.square().mean(1, keepdim=True).sqrt()
        return (x64 / torch.where(rms > 0, rms, torch.ones_like(rms))).to(out_dtype)
    st = stats if stats is not None else ColumnStats().update(x64)
    std, mean = st.std.to(x.device), st.mean.to(x.device)  # type: ignore[union-attr]
    if std.shape[0] != x.shape[1]:
        raise ValueError(f"stats describe {std.shape[0]} dimensions, x has {x.shape[1]}")
    z = (x64 - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, z, torch.zeros_like(z)).to(out_dtype)
