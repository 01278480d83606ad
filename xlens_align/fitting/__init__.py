"""Pipelines that fit maps on a model pair: they collect activations and, for the adapter, patch B.

The estimators themselves (`xlens_align.maps`) know nothing of models; these functions feed them:

* `fit_grid`: closed-form maps for many (point of A, point of B) pairs from one streamed pass;
* `fit_maps`: any fit functions on collected paired rows (used by `effects.grid`);
* `train_adapter`: an `Adapter` trained through B's next-token loss on the shared batch plan
  and scorer, so its validation loss equals `effects.measure`'s ``ce_patched``;
* `fit_injection`: the embedding-injection baseline (A's layer N -> B's input embeddings);
* `provenance`: the record every map fitted from a pair carries.
"""

from .adapter import frozen, train_adapter
from .grid import GRID_KINDS, fit_grid, fit_maps, provenance
from .injection import fit_injection

__all__ = ["GRID_KINDS", "fit_grid", "fit_injection", "fit_maps", "frozen", "provenance", "train_adapter"]
