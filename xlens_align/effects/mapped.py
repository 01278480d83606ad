"""A map applied as a patch: checking a map against a pair and points, and one batch's patch.

>>> mp = xa.effects.mapped_patch(pair, m, texts, source="resid_post.3", target="resid_post.2")
>>> with mp.applied(pair.b):
...     logits = pair.b.forward(mp.input_ids, mp.attention_mask)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..patching import patch, patch_hooks
from ..plan import apply_map, make_plan, plans, read_a
from ..points import Point
from ..rows import RowFilter
from ..tokens import AlignedBatch
from ..validate import check_texts

__all__ = ["MappedPatch", "check_map", "is_map", "map_kind", "mapped_patch", "resolve"]


def resolve(model: Any, point: Any, arg: str, side: str) -> Point:
    """`point` of `model` as a `Point`; the model's ValueError (listing valid points) names `arg`."""
    try:
        return model.point(point)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{arg}: model {side} ({model.name}): {e}") from e


def is_map(m: Any) -> bool:
    """An instance with a transform method (a class with one is a fit function)."""
    return not isinstance(m, type) and callable(getattr(m, "transform", None))


def map_kind(m: Any) -> str:
    return str(getattr(m, "kind", "") or type(m).__name__)


def _canonical(model: Any, point: Any) -> Any:
    try:
        return model.point(point).name
    except (ValueError, TypeError):
        return point


def check_map(pair: Any, map: Any, source: Any, target: Any) -> tuple[Point, Point]:
    """Validate `map` for a patch from A's `source` to B's `target`; returns the two `Point`s.

    Checks: both points exist (ValueError listing the valid ones), the map has ``transform``,
    its declared widths (``d_in_`` / ``d_out_``, when it has them) equal A's / B's d_model, and
    its ``provenance`` (when it has one) names the same source and target points, model ids and
    config hashes as given here. Keys absent from the provenance are not checked.
    """
    a, b = pair.a, pair.b
    src = resolve(a, source, "source", "A")
    tgt = resolve(b, target, "target", "B")
    if not is_map(map):
        what = f"the class {map.__name__}" if isinstance(map, type) else type(map).__name__
        raise TypeError(
            f"map must be a fitted object with a transform(X [n, d_A]) -> [n, d_B] method, got {what}"
        )
    for attr, model, side in (("d_in_", a, "A"), ("d_out_", b, "B")):
        width = getattr(map, attr, None)
        if isinstance(width, int) and width != model.d_model:
            what = "input" if attr == "d_in_" else "output"
            raise ValueError(
                f"map {what} width {attr}={width} does not match model {side} ({model.name}) "
                f"d_model={model.d_model}: the map was fit for another model"
            )
    prov = getattr(map, "provenance", None)
    if isinstance(prov, Mapping):
        expected: dict[str, tuple[Any, Any]] = {}
        if prov.get("source") is not None:
            expected["source"] = (src.name, _canonical(a, prov["source"]))
        if prov.get("target") is not None:
            expected["target"] = (tgt.name, _canonical(b, prov["target"]))
        for side, model in (("a", a), ("b", b)):
            for key in ("model_id", "config_hash"):
                k = f"{key}_{side}"
                if prov.get(k) is not None:
                    expected[k] = (getattr(model, key), prov[k])
        wrong = [f"{k}: expected {e!r}, found {f!r}" for k, (e, f) in expected.items() if e != f]
        if wrong:
            raise ValueError(
                f"map provenance does not match this patch (A={a.name!r} {src} -> B={b.name!r} {tgt}): "
                + "; ".join(wrong)
                + ". Use the map fit for these points and models (or re-bind it with map.bind(...) "
                "if the mismatch is intended)"
            )
    return src, tgt


@dataclass
class MappedPatch:
    """A mapped patch of one aligned batch, ready to apply to B.

    `values` [n, d_B] (B's dtype/device) go to `target` at ``positions = (batch_idx, pos_b)``;
    `input_ids` / `attention_mask` are B's tokens of the batch.
    """

    batch: AlignedBatch
    source: str
    target: str
    values: Float[Tensor, "n d_b"]
    positions: tuple[Int[Tensor, " n"], Int[Tensor, " n"]]
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]

    def hooks(self, model: Any) -> list[tuple[str, Callable]]:
        """(hook_name, fn) pairs for `run_with_hooks` (see `patching.patch_hooks`)."""
        return patch_hooks(model, self.target, self.values, self.positions)

    def applied(self, model: Any) -> contextlib.AbstractContextManager:
        """Context manager: forward passes of `model` (B) see the patch."""
        return patch(model, self.target, self.values, self.positions)


def mapped_patch(
    pair: Any,
    map: Any,
    texts: Sequence[str] | AlignedBatch,
    *,
    source: str,
    target: str,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
) -> MappedPatch:
    """Run A on `texts` (one batch) and map its `source` rows into B's `target` at the plan's
    write cells (see `plan`)."""
    src, tgt = check_map(pair, map, source, target)
    rows = RowFilter(drop_first=drop_first, massive=massive, clamp=clamp)
    if isinstance(texts, AlignedBatch):
        plan = make_plan(pair, texts, rows)
    else:
        texts = check_texts(texts)
        plan = next(
            plans(pair, texts, batch_size=len(texts), rows=rows, max_length=max_length, overflow=overflow)
        )
    with torch.no_grad():
        X, plan = read_a(pair.a, plan, [src], rows)
        Y = apply_map(map, X[src], pair, src, tgt)
    return MappedPatch(plan.batch, src.name, tgt.name, Y, plan.write_b, plan.ids_b, plan.mask_b)
