"""Alignment maps from a residual point of model A to one of model B.

Closed-form kinds (fit from tensors or from streamed `CrossStats`): `Procrustes`, `Affine`,
`LowRank`, `CCA`. Learned: `MLP`. All follow scikit-learn's contract (`fit` returns self,
fitted state ends in ``_``, `transform`, `score`) and save to one safetensors file
(`AlignmentMap.save`, `load`). New kinds register with ``@register("name")``.

>>> m = Affine(alpha="cv").fit(X, Y).bind(a=model_a, b=model_b, source="resid_post.10", target="resid_post.8")
>>> m.score(X_test, Y_test)["r2"]
>>> m.save("m.safetensors"); m2 = load("m.safetensors", a=model_a, b=model_b)
"""

from xlens_align.maps.adapter import Adapter, patched_loss, train_adapter
from xlens_align.maps.base import (
    AlignmentMap,
    NotFittedError,
    register,
    registry,
    regression_scores,
    split_indices,
)
from xlens_align.maps.grid import fit_grid
from xlens_align.maps.injection import EmbeddingInjection
from xlens_align.maps.io import load, read_metadata
from xlens_align.maps.linear import CCA, Affine, LinearMap, LowRank, Procrustes
from xlens_align.maps.mlp import MLP
from xlens_align.maps.preprocess import Preprocessor

__all__ = [
    "CCA",
    "MLP",
    "Affine",
    "AlignmentMap",
    "LinearMap",
    "LowRank",
    "NotFittedError",
    "Preprocessor",
    "Procrustes",
    "load",
    "read_metadata",
    "register",
    "registry",
    "regression_scores",
    "split_indices",
    "Adapter",
    "EmbeddingInjection",
    "fit_grid",
    "patched_loss",
    "train_adapter",
]
