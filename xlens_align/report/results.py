"""results.json entries from the library's objects, in the schema `report.schema` checks.

`similarity_entry(grid, view=, filtered=)` for a `similarity.Grid`, `functional_entry(patch_grid)`
for `effects.grid`'s `PatchGrid`, `effect_row(effect, pair)` for an `Effect` (with the relative
depths the depth plots use), `generation_row(gen, map_kind)` for `generate`'s dict, and `dumps`
for the file (standard JSON: NaN as null, infinities as "inf" / "-inf").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..points import parse_point
from ..similarity.grid import _jsonable
from .schema import SCHEMA, VIEWS, check

__all__ = [
    "SCHEMA",
    "dumps",
    "effect_row",
    "functional_entry",
    "generation_row",
    "relative_depth",
    "similarity_entry",
]


def relative_depth(point: str, n_layers: int) -> float:
    """Fraction of the blocks a point has gone through: embed and resid_pre.0 are 0, resid_mid.l
    is (l + 0.5) / L, resid_post.l is (l + 1) / L, final is 1."""
    p = parse_point(point, n_layers)
    if p.kind == "embed":
        return 0.0
    if p.kind == "final":
        return 1.0
    return (p.layer + {"resid_pre": 0.0, "resid_mid": 0.5, "resid_post": 1.0}[p.kind]) / n_layers


def similarity_entry(
    grid: Any, *, filtered: bool, view: str | None = None, label: str | None = None
) -> dict[str, Any]:
    """A ``similarity`` entry from a `Grid`: its values (NaN as null), per-cell controls when the
    grid has them (p_values, ci_low, ci_high) and the best match of each point of A. view: the
    grid's own (``Grid.view``; "raw" for a grid without one) unless given."""
    view = view if view is not None else getattr(grid, "view", "raw")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if not isinstance(filtered, bool):
        raise TypeError(f"filtered must be True or False, got {filtered!r}")
    entry = {
        "measure": grid.measure,
        "view": view,
        "filtered": filtered,
        "label": label or f"{grid.measure}, {view}, {'filtered' if filtered else 'unfiltered'}",
        "points_a": list(grid.points_a),
        "points_b": list(grid.points_b),
        "values": _jsonable(grid.values),
        "n_rows": int(grid.n_tokens),
        "best_match": {pa: [pb, v] for pa, (pb, v) in grid.best_match().items()},
    }
    for key in ("p_values", "ci_low", "ci_high", "rows"):
        if grid.extra.get(key) is not None:
            entry[key] = _jsonable(grid.extra[key])
    return entry


def functional_entry(pg: Any, map_kind: str | None = None) -> dict[str, Any]:
    """The ``functional`` section from a `PatchGrid` (`map_kind` defaults to its cells' kind)."""
    kinds = sorted({e.map_kind for e in pg.effects.values()})
    return {
        "map_kind": map_kind or ", ".join(kinds),
        "points_a": list(pg.sources),
        "points_b": list(pg.targets),
        "recovered": _jsonable(pg.recovered),
        "kl": _jsonable(pg.kl),
        "top1_agreement": _jsonable(pg.top1),
        "ce_clean": pg.ce_clean,
        "ce_ablated": dict(pg.ce_ablated),
        "n_tokens": pg.n_tokens,
        "ablation": pg.ablation,
    }


def effect_row(effect: Any, pair: Any, **extra: Any) -> dict[str, Any]:
    """An ``effects`` (or ``adapter``) row: ``Effect.as_dict()`` plus depth_a / depth_b and
    `extra` (e.g. ``recovered_ci=[lo, hi]``, ``objective=...``)."""
    row = effect.as_dict()
    row["depth_a"] = relative_depth(effect.source, pair.a.n_layers)
    row["depth_b"] = relative_depth(effect.target, pair.b.n_layers)
    return {**row, **extra}


def generation_row(gen: Mapping[str, Any], map_kind: str) -> dict[str, Any]:
    """A ``generations`` row from `effects.generate`'s dict."""
    keys = ("prompt", "source", "target", "clean", "patched", "ablated")
    missing = [k for k in keys if k not in gen]
    if missing:
        raise ValueError(f"gen must be effects.generate's dict; it lacks {missing}")
    return {"map_kind": map_kind, **{k: str(gen[k]) for k in keys}}


def dumps(results: Mapping[str, Any], indent: int | None = 1) -> str:
    """results.json text: checked first (ValueError naming a malformed section), then written as
    standard JSON (NaN as null, infinities as "inf" / "-inf")."""
    check(results)
    return json.dumps(_jsonable(_floats(results)), indent=indent, allow_nan=False)


def _floats(obj: Any) -> Any:
    """Python floats for NumPy / torch scalars, so `_jsonable` sees NaN and infinities."""
    if isinstance(obj, Mapping):
        return {str(k): _floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_floats(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    return obj
