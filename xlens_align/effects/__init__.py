"""What a mapped patch does to model B's predictions.

A *mapped patch* runs model A on some texts, takes A's residual stream at a `source` point at
the aligned positions, sends those rows through an alignment map (any object with
``transform(X [n, d_A]) -> [n, d_B]``), casts them to B's dtype and device and writes them into
B's residual stream at a `target` point, at B's last token of the same chunks. Which cells are
read and written and which predictions are scored is `xlens_align.plan`'s one rule; the losses
are `xlens_align.scoring`'s one scorer.

>>> eff = xa.effects.measure(pair, m, source="resid_post.10", target="resid_post.8", texts=texts,
...                          ablation_texts=held_out)
>>> g = xa.effects.grid(pair, {("resid_post.3", "resid_post.2"): m, ...}, texts, ablation_texts=held_out)
>>> print(xa.effects.table([eff, *g.effects.values()]).text)
>>> xa.generate(pair, m, "The capital of France is", source=..., target=..., ablation="zero")

The *embedding-injection* baseline is a map whose target is B's ``"embed"`` point; it goes
through the same code and tables (``Effect.mode == "inject"``).

Modules, one job each: `mapped` (checking a map, one batch's patch), `ablation` (baselines),
`measure` (one patch), `grid` (the functional grid; `grids`: several sets of maps in one pass), `generation` (text under a patch),
`tables` (results).
"""

from .ablation import ABLATIONS, mean_activation
from .generation import generate
from .grid import PatchGrid, grid, grids
from .mapped import MappedPatch, check_map, mapped_patch
from .measure import measure
from .tables import Effect, EffectTable, table

__all__ = [
    "ABLATIONS",
    "Effect",
    "EffectTable",
    "MappedPatch",
    "PatchGrid",
    "check_map",
    "generate",
    "grid",
    "grids",
    "mapped_patch",
    "mean_activation",
    "measure",
    "table",
]
