"""xlens-align: compare and stitch two different language models with TransformerLens.

Submodules are imported lazily, so `import xlens_align as xa` is cheap and
`xa.similarity.cka(...)` works without loading model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "validate",
    "files",
    "rows",
    "plan",
    "scoring",
    "fitting",
    "points",
    "packaged",
    "tokenizers",
    "tokens",
    "models",
    "remote",
    "stats",
    "distributed",
    "corpus",
    "activations",
    "maps",
    "similarity",
    "patching",
    "effects",
    "transfer",
    "testing",
    "report",
    "cli",
}
_EXPORTS = {
    "load_model": "remote",  # models.load_model, or a RemoteModel for "remote:<source>"
    "LensModel": "models",
    "point_at_depth": "models",
    "ModelPair": "models",
    "AlignedBatch": "tokens",
    "collect": "activations",
    "PairedBatch": "activations",
    "patch": "patching",
    "generate": "effects",
    "RowFilter": "rows",
    "train_adapter": "fitting",
    "fit_grid": "fitting",
    "CrossStats": "stats",
}

__all__ = sorted(_SUBMODULES | set(_EXPORTS) | {"__version__"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'xlens_align' has no attribute {name!r}")
