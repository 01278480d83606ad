"""What a results.json holds, checked section by section before anything is drawn.

`check(results)` returns the results with every number as a float (None, NaN, "nan", "inf" and
"-inf" as float NaN / inf) and raises ValueError naming the section and key that has the wrong
shape. Sections are optional; an absent section is simply not drawn.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from ..similarity.views import VIEWS

__all__ = ["SCHEMA", "SECTIONS", "VIEWS", "check", "number"]

SCHEMA = 1
SECTIONS = (
    "settings",
    "coverage",
    "similarity",
    "functional",
    "effects",
    "adapter",
    "generations",
    "maps",
    "checks",
)
_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_CIS = ("recovered_ci", "kl_ci", "top1_ci")


def number(value: Any, where: str) -> float:
    """`value` as a float: a real number, None / "nan" (NaN), "inf" or "-inf"; bools refused."""
    if value is None:
        return math.nan
    if isinstance(value, str) and value in _SPECIAL:
        return _SPECIAL[value]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{where} must be a number (or null), got {value!r}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise ValueError(f"{where} must be a JSON list, got {type(value).__name__}")
    return list(value)


def _string(row: Mapping[str, Any], key: str, where: str) -> str:
    if key not in row:
        raise ValueError(f"{where} lacks {key!r}")
    if not isinstance(row[key], str):
        raise ValueError(f"{where}[{key!r}] must be a string, got {row[key]!r}")
    return row[key]


def _points(row: Mapping[str, Any], key: str, where: str) -> list[str]:
    if key not in row:
        raise ValueError(f"{where} lacks {key!r}")
    pts = _list(row[key], f"{where}[{key!r}]")
    if not pts or not all(isinstance(p, str) for p in pts):
        raise ValueError(f"{where}[{key!r}] must be a non-empty list of point names, got {row[key]!r}")
    return pts


def _matrix(row: Mapping[str, Any], key: str, shape: tuple[int, int], where: str) -> list[list[float]]:
    if key not in row:
        raise ValueError(f"{where} lacks {key!r}")
    rows = _list(row[key], f"{where}[{key!r}]")
    if len(rows) != shape[0]:
        raise ValueError(f"{where}[{key!r}] must have {shape[0]} rows (one per point of A), got {len(rows)}")
    out = []
    for i, r in enumerate(rows):
        r = _list(r, f"{where}[{key!r}][{i}]")
        if len(r) != shape[1]:
            raise ValueError(
                f"{where}[{key!r}][{i}] must have {shape[1]} values (one per point of B), got {len(r)}"
            )
        out.append([number(v, f"{where}[{key!r}][{i}][{j}]") for j, v in enumerate(r)])
    return out


def _similarity(entry: Any, where: str) -> dict[str, Any]:
    e = dict(_mapping(entry, where))
    _string(e, "measure", where)
    view = _string(e, "view", where)
    if view not in VIEWS:
        raise ValueError(f"{where}['view'] must be one of {VIEWS}, got {view!r}")
    if not isinstance(e.get("filtered"), bool):
        raise ValueError(f"{where}['filtered'] must be true or false, got {e.get('filtered')!r}")
    shape = (len(_points(e, "points_a", where)), len(_points(e, "points_b", where)))
    e["values"] = _matrix(e, "values", shape, where)
    for key in ("p_values", "ci_low", "ci_high"):
        if e.get(key) is not None:
            e[key] = _matrix(e, key, shape, where)
    n = e.get("n_rows")
    if not (isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0):
        raise ValueError(f"{where}['n_rows'] must be an int >= 0, got {n!r}")
    if "label" in e and not isinstance(e["label"], str):
        raise ValueError(f"{where}['label'] must be a string, got {e['label']!r}")
    if e.get("best_match") is not None:
        best = {}
        for pa, m in _mapping(e["best_match"], f"{where}['best_match']").items():
            w = f"{where}['best_match'][{pa!r}]"
            if isinstance(m, Mapping):
                m = (m.get("point_b"), m.get("value"))
            m = _list(m, w)
            if len(m) != 2 or not isinstance(m[0], str):
                raise ValueError(f"{w} must be [point of B, value] or {{'point_b', 'value'}}, got {m!r}")
            best[pa] = (m[0], number(m[1], w))
        e["best_match"] = best
    return e


def _functional(section: Any, where: str = "functional") -> dict[str, Any]:
    f = dict(_mapping(section, where))
    _string(f, "map_kind", where)
    shape = (len(_points(f, "points_a", where)), len(_points(f, "points_b", where)))
    for key in ("recovered", "kl", "top1_agreement"):
        f[key] = _matrix(f, key, shape, where)
    return f


def _functionals(section: Any) -> list[dict[str, Any]]:
    """One functional grid (an object) or one per map kind (a list of them), as a list."""
    if isinstance(section, Mapping):
        return [_functional(section)]
    return [_functional(e, f"functional[{i}]") for i, e in enumerate(_list(section, "functional"))]


def _effect(row: Any, where: str, *, depth: bool) -> dict[str, Any]:
    r = dict(_mapping(row, where))
    for key in ("source", "target", "map_kind"):
        _string(r, key, where)
    keys = ["recovered", "kl", "top1_agreement"] + (["depth_a", "depth_b"] if depth else [])
    for key in keys:
        if key not in r:
            raise ValueError(f"{where} lacks {key!r}")
        r[key] = number(r[key], f"{where}[{key!r}]")
    for key in ("ce_clean", "ce_patched", "ce_ablated", "kl_ablated", "top1_ablated"):
        if key in r:
            r[key] = number(r[key], f"{where}[{key!r}]")
    for key in _CIS:
        if r.get(key) is not None:
            ci = _list(r[key], f"{where}[{key!r}]")
            if len(ci) != 2:
                raise ValueError(f"{where}[{key!r}] must be [low, high], got {r[key]!r}")
            r[key] = [number(v, f"{where}[{key!r}]") for v in ci]
    return r


def _rows(section: Any, name: str, required: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(_list(section, name)):
        r = dict(_mapping(row, f"{name}[{i}]"))
        for key in required:
            _string(r, key, f"{name}[{i}]")
        out.append(r)
    return out


def check(results: Any) -> dict[str, Any]:
    """The results dict, validated and normalised (see the module docstring)."""
    res = dict(_mapping(results, "results"))
    if res.get("schema") != SCHEMA:
        raise ValueError(f"results['schema'] must be {SCHEMA}, got {res.get('schema')!r}")
    for key in ("settings", "coverage", "checks"):
        if res.get(key) is not None:
            res[key] = dict(_mapping(res[key], key))
    if res.get("similarity") is not None:
        res["similarity"] = [
            _similarity(e, f"similarity[{i}]") for i, e in enumerate(_list(res["similarity"], "similarity"))
        ]
    if res.get("functional") is not None:
        res["functional"] = _functionals(res["functional"])
    if res.get("effects") is not None:
        res["effects"] = [
            _effect(r, f"effects[{i}]", depth=True) for i, r in enumerate(_list(res["effects"], "effects"))
        ]
    if res.get("adapter") is not None:
        res["adapter"] = [
            _effect(r, f"adapter[{i}]", depth=False) for i, r in enumerate(_list(res["adapter"], "adapter"))
        ]
    if res.get("generations") is not None:
        keys = ("prompt", "map_kind", "source", "target", "clean", "patched", "ablated")
        res["generations"] = _rows(res["generations"], "generations", keys)
    if res.get("maps") is not None:
        res["maps"] = _rows(res["maps"], "maps", ("map_kind", "source", "target"))
        for i, m in enumerate(res["maps"]):
            if m.get("score") is not None:
                _mapping(m["score"], f"maps[{i}]['score']")
    return res
