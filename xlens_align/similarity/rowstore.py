"""`RowStore`: the rows of every point of a grid held in memory, up to a cap (error beyond it, or a
seeded uniform reservoir sample of the cap's size)."""

from __future__ import annotations

import torch
from torch import Tensor

from xlens_align.files import check_seed

__all__ = ["RowStore"]

Acts = dict[str, Tensor]


class RowStore:
    """All paired rows per point, up to `max_rows` (None: unlimited).

    More rows raise a ValueError naming `what`, unless `subsample` is set: then a uniform
    reservoir sample of `max_rows` rows is kept (Algorithm R, seeded by `seed`), without
    sampling a row twice.
    """

    def __init__(self, max_rows: int | None, subsample: bool, seed: int, what: str) -> None:
        if max_rows is not None and (
            isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1
        ):
            raise ValueError(f"max_rows must be a positive int or None (unlimited), got {max_rows!r}")
        if subsample and max_rows is None:
            raise ValueError("subsample=True needs a max_rows sample size")
        self.max_rows, self.subsample, self.what = max_rows, subsample, what
        self.gen = torch.Generator().manual_seed(check_seed(seed))
        self.chunks: list[tuple[Acts, Acts]] = []
        self.full: tuple[Acts, Acts] | None = None
        self.seen = 0

    @property
    def subsampled(self) -> bool:
        """True when more rows arrived than the reservoir holds."""
        return self.full is not None and self.max_rows is not None and self.seen > self.max_rows

    def add(self, a: Acts, b: Acts, n: int) -> None:
        """Add one batch of `n` paired rows (dicts point -> Tensor [n, d])."""
        cap = self.max_rows
        if cap is None or self.seen + n <= cap:
            self.chunks.append((a, b))
            self.seen += n
            return
        if not self.subsample:
            raise ValueError(
                f"measure {self.what!r} needs all rows in memory and more than max_rows={cap} rows "
                "arrived; pass max_rows=None (unlimited), a larger max_rows, or subsample=True "
                "(uniform sample of max_rows rows)"
            )
        if self.full is None:  # fill the reservoir
            a0, b0 = self._concat()
            take = cap - self.seen
            self.full = (
                {p: torch.cat([a0[p], t[:take]]) if a0 else t[:take].clone() for p, t in a.items()},
                {p: torch.cat([b0[p], t[:take]]) if b0 else t[:take].clone() for p, t in b.items()},
            )
            self.chunks = []
            self.seen += take
            a = {p: t[take:] for p, t in a.items()}
            b = {p: t[take:] for p, t in b.items()}
            n -= take
        # Algorithm R, vectorised: row with global index t replaces slot j ~ U{0..t} if j < cap;
        # when several rows of this batch pick one slot, the last one wins (as sequentially)
        t = self.seen + torch.arange(n, dtype=torch.float64)
        j = torch.floor(torch.rand(n, generator=self.gen, dtype=torch.float64) * (t + 1)).long()
        sel = torch.nonzero(j < cap).flatten()
        self.seen += n
        if sel.numel() == 0:
            return
        last = torch.full((cap,), -1, dtype=torch.long).scatter_reduce(0, j[sel], sel, "amax")
        slots = torch.nonzero(last >= 0).flatten()
        rows = last[slots]
        for store, new in ((self.full[0], a), (self.full[1], b)):
            for p, tens in new.items():
                store[p][slots.to(tens.device)] = tens[rows.to(tens.device)]

    def _concat(self) -> tuple[Acts, Acts]:
        if not self.chunks:
            return {}, {}
        keys_a, keys_b = list(self.chunks[0][0]), list(self.chunks[0][1])
        return (
            {p: torch.cat([c[0][p] for c in self.chunks]) for p in keys_a},
            {p: torch.cat([c[1][p] for c in self.chunks]) for p in keys_b},
        )

    def rows(self) -> tuple[Acts, Acts]:
        """The rows kept, as (A dict, B dict) of [n, d] tensors."""
        return self.full if self.full is not None else self._concat()
