"""Statistical controls of every cell of a layer grid: permutation p-values and bootstrap
intervals (`controls`) of the measure's pure function, on a uniform sample of the grid's rows."""

from __future__ import annotations

import math
import warnings
from typing import Any

from tqdm.auto import tqdm

from ._util import DegenerateInputWarning
from .controls import bootstrap_ci, permutation_test
from .measures import pure_function
from .rowstore import RowStore

__all__ = ["cell_controls"]


def cell_controls(
    sample: RowStore,
    name: str,
    measure: Any,
    kw: dict[str, Any],
    pa: list[str],
    pb: list[str],
    *,
    n_perm: int,
    n_boot: int,
    level: float,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """``{"controls": how, "p_values": [P_A][P_B], "ci_low": ..., "ci_high": ...}`` (the last
    three when requested) for grid measure `name`, on the rows of `sample`."""
    fn, alternative = pure_function(name, measure, kw)
    xa, xb = sample.rows()
    out: dict[str, Any] = {
        "controls": {
            "rows": next(iter(xa.values())).shape[0],
            "n_perm": n_perm,
            "n_boot": n_boot,
            "level": level,
            "seed": seed,
            "alternative": alternative,
            "function": getattr(fn, "__name__", name) if callable(measure) else name,
        }
    }
    p_values = [[math.nan] * len(pb) for _ in pa]
    lo = [[math.nan] * len(pb) for _ in pa]
    hi = [[math.nan] * len(pb) for _ in pa]
    bar = tqdm(total=len(pa) * len(pb), desc="controls", disable=not progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateInputWarning)
        for i, p in enumerate(pa):
            for j, q in enumerate(pb):
                if n_perm:
                    p_values[i][j] = permutation_test(
                        fn, xa[p], xb[q], n_perm=n_perm, seed=seed, alternative=alternative
                    )
                if n_boot:
                    lo[i][j], hi[i][j] = bootstrap_ci(fn, xa[p], xb[q], n_boot=n_boot, level=level, seed=seed)
                bar.update(1)
    bar.close()
    if n_perm:
        out["p_values"] = p_values
    if n_boot:
        out["ci_low"], out["ci_high"] = lo, hi
    return out
