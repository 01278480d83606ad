"""Representational similarity between two models' activations (all computed in float64).

Pure functions of two ``[n, d]`` tensors whose rows describe the same items:
`cka` (linear / RBF, debiased by default), `cca_corr`, `svcca`, `pwcca`,
`procrustes_distance`, `mutual_knn`, `rsa`. Streaming: `MinibatchCKA` (a whole layer grid
in one pass), `cka_from_stats` / `cka_grid_from_stats` (from `xlens_align.stats`).
Controls: `permutation_test`, `bootstrap_ci`. Layer grids: `layer_grid` -> `Grid`; what they compare:
`view` (`VIEWS`: the raw stream, RMS-normalised rows, standardized dimensions).

Degenerate input (all rows identical) gives the measure's "no shared structure" value with a
`DegenerateInputWarning`; non-finite, non-2-D or mismatched input raises ValueError. Every measure
here is scale invariant, and each input is first multiplied by a power of two (exact) that brings
its largest |value| near 1, so values near 1e200 or 1e-200 give the same result as values near 1.
A grid on fewer rows than its measure needs raises ValueError (how many aligned rows there are,
how many are needed, what the row filters took); one on fewer than `MIN_GRID_ROWS` (32) warns with
`SmallSampleWarning`.
"""

from ._util import DegenerateInputWarning, SmallSampleWarning
from .cca import canonical_correlations, cca_corr, pwcca, svcca
from .cka import (
    cka,
    cka_from_stats,
    cka_grid_from_stats,
    gram_linear,
    gram_rbf,
    hsic_biased,
    hsic_unbiased,
    u_center,
)
from .controls import Interval, bootstrap_ci, permutation_test
from .geometry import knn_indices, mutual_knn, procrustes_distance, rankdata, rdm, rsa, spearman
from .grid import Grid
from .streaming import MinibatchCKA
from .sweep import MEASURES, MIN_GRID_ROWS, grid_from_batches, layer_grid
from .views import VIEWS, view

__all__ = [
    "MEASURES",
    "MIN_GRID_ROWS",
    "VIEWS",
    "DegenerateInputWarning",
    "Grid",
    "Interval",
    "MinibatchCKA",
    "SmallSampleWarning",
    "bootstrap_ci",
    "canonical_correlations",
    "cca_corr",
    "cka",
    "cka_from_stats",
    "cka_grid_from_stats",
    "grid_from_batches",
    "gram_linear",
    "gram_rbf",
    "hsic_biased",
    "hsic_unbiased",
    "knn_indices",
    "layer_grid",
    "mutual_knn",
    "permutation_test",
    "procrustes_distance",
    "pwcca",
    "rankdata",
    "rdm",
    "rsa",
    "spearman",
    "svcca",
    "u_center",
    "view",
]
