"""Representational similarity between two models' activations (all computed in float64).

Pure functions of two ``[n, d]`` tensors whose rows describe the same items:
`cka` (linear / RBF, debiased by default), `cca_corr`, `svcca`, `pwcca`,
`procrustes_distance`, `mutual_knn`, `rsa`. Streaming: `MinibatchCKA` (a whole layer grid
in one pass), `cka_from_stats` / `cka_grid_from_stats` (from `xlens_align.stats`).
Controls: `permutation_test`, `bootstrap_ci`. Layer grids: `layer_grid` -> `Grid`.

Degenerate input (all rows identical) gives the measure's "no shared structure" value with a
`DegenerateInputWarning`; non-finite, non-2-D or mismatched input raises ValueError.
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
from .sweep import MEASURES, grid_from_batches, layer_grid

__all__ = [
    "MEASURES",
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
]
