"""Alignment maps from a residual point of model A to one of model B: estimators only.

Closed-form kinds (fit from tensors or from streamed `CrossStats`): `Procrustes`, `Affine`,
`LowRank`, `CCA`. Learned (`maps.training`'s loop): `MLP`, and the `Adapter` (trained on the
rows, or on a loss the caller computes, e.g. through model B). All follow scikit-learn's
contract (`fit` returns self, fitted state ends in ``_``, `transform`, `score`) and save to one
safetensors file (`AlignmentMap.save`, `load`). New kinds register with ``@register("name")``.
Pipelines that collect activations from a `ModelPair` and fit maps on them live in
`xlens_align.fitting`.

>>> m = Affine(alpha="cv").fit(X, Y).bind(a=model_a, b=model_b, source="resid_post.10", target="resid_post.8")
>>> m.score(X_test, Y_test)["r2"]
>>> m.save("m.safetensors"); m2 = load("m.safetensors", a=model_a, b=model_b)
"""

from xlens_align.maps.adapter import Adapter
from xlens_align.maps.base import (
    AlignmentMap,
    NotFittedError,
    error_scores,
    load,
    register,
    registry,
    regression_scores,
)
from xlens_align.maps.injection import EmbeddingInjection
from xlens_align.maps.io import read_metadata
from xlens_align.maps.linear import CCA, Affine, LinearMap, LowRank, Procrustes
from xlens_align.maps.mlp import MLP
from xlens_align.maps.preprocess import PreprocessingParams, Preprocessor

__all__ = [
    "CCA",
    "MLP",
    "Adapter",
    "Affine",
    "AlignmentMap",
    "EmbeddingInjection",
    "LinearMap",
    "LowRank",
    "NotFittedError",
    "PreprocessingParams",
    "Preprocessor",
    "Procrustes",
    "error_scores",
    "load",
    "read_metadata",
    "register",
    "registry",
    "regression_scores",
]
