"""What one mapped patch does to B's next-token predictions (`measure`).

>>> eff = xa.effects.measure(pair, m, source="resid_post.10", target="resid_post.8", texts=texts,
...                          ablation_texts=held_out)
>>> eff.recovered, eff.kl, eff.top1_agreement

Per batch of `texts`: one forward of A (stopped after `source`), then three of B (clean, ablated,
patched), scored on the plan's predictions (`plan`: from the first patched position on) by the
one scorer (`scoring`). It is the functional grid's engine with one cell and one run per forward,
so `measure` and `grid` agree cell by cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .grid import run_grid
from .intervals import add_intervals, check_interval_args
from .mapped import check_map
from .tables import Effect

__all__ = ["measure"]


def measure(
    pair: Any,
    map: Any,
    *,
    source: str,
    target: str,
    texts: Sequence[str],
    ablation: str | Tensor = "mean",
    ablation_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
    n_boot: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> Effect:
    """Effect of patching ``map(A[source])`` into B at `target` (see `plan` for which cells are
    written and which predictions are scored, `effects.ablation` for the baselines, `rows` for
    `drop_first` / `massive` / `clamp`; `massive` judges A's source rows). ``n_boot > 0``: percentile
    bootstrap intervals at `level` over `texts` on recovered / KL / top-1 (``eff.recovered_ci``, ...;
    `effects.intervals`), seeded by `seed`."""
    n_boot, level, seed = check_interval_args(n_boot, level, seed)
    src, tgt = check_map(pair, map, source, target)
    g = run_grid(
        pair, {(src, tgt): map}, texts, sources=None, targets=None, fit_texts=None, ablation=ablation,
        ablation_texts=ablation_texts, batch_size=batch_size, drop_first=drop_first, massive=massive,
        clamp=clamp, cells_per_forward=1, max_length=max_length, overflow=overflow, progress=progress,
        stacklevel=3,
    )  # fmt: skip
    return add_intervals(g, n_boot, level, seed).effects[src.name, tgt.name]
