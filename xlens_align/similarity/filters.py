"""Row filters applied to paired activation batches before a layer grid accumulates them.

Llama/Mistral residual streams carry *massive activations* (norms 100-1000x the typical token
on BOS and the first delimiter) that dominate linear CKA and Procrustes. A filter is any
callable ``(acts_a, acts_b) -> (acts_a, acts_b)`` on dicts point -> Tensor [n, d] that keeps
rows paired; the built-in ones count what they did and report it with `describe()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from xlens_align.activations import massive_rows

__all__ = ["Clamp", "DropMassiveRows", "resolve_filters"]

Acts = Mapping[str, Tensor]
Filter = Callable[[Acts, Acts], tuple[Acts, Acts]]


class DropMassiveRows:
    """Drop the rows (tokens) whose L2 norm at any point of either model exceeds `max_ratio`
    times that point's median row norm in the batch (both models lose the same rows).

    The default ratio 5 was set on SmolLM2-135M / pydoc: ordinary tokens' norms stay within
    ~1.2x of the median (90th percentile), while the massive-activation tokens reach 9x (layer 4)
    to 175x (layer 12) through one dimension; a ratio of 20 missed those of layers 2-8."""

    name = "drop_massive"

    def __init__(self, max_ratio: float = 5.0) -> None:
        if not max_ratio > 1.0:
            raise ValueError(f"max_ratio must be > 1, got {max_ratio!r}")
        self.max_ratio = float(max_ratio)
        self.rows_seen = 0
        self.rows_dropped = 0

    def __call__(self, acts_a: Acts, acts_b: Acts) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        tensors = [*acts_a.values(), *acts_b.values()]
        if not tensors:
            return dict(acts_a), dict(acts_b)
        n = tensors[0].shape[0]
        keep = ~massive_rows(tensors, self.max_ratio)
        self.rows_seen += n
        dropped = int(n - keep.sum())
        self.rows_dropped += dropped
        if not dropped:
            return dict(acts_a), dict(acts_b)
        return (
            {p: t[keep.to(t.device)] for p, t in acts_a.items()},
            {p: t[keep.to(t.device)] for p, t in acts_b.items()},
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_ratio": self.max_ratio,
            "rows_seen": self.rows_seen,
            "rows_dropped": self.rows_dropped,
        }


class Clamp:
    """Clamp every activation to [-limit, limit] (rows are kept)."""

    name = "clamp"

    def __init__(self, limit: float = 1e3) -> None:
        if not limit > 0:
            raise ValueError(f"limit must be > 0, got {limit!r}")
        self.limit = float(limit)
        self.values_clamped = 0

    def __call__(self, acts_a: Acts, acts_b: Acts) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        out = []
        for acts in (acts_a, acts_b):
            d = {}
            for p, t in acts.items():
                self.values_clamped += int((t.abs() > self.limit).sum())
                d[p] = t.clamp(-self.limit, self.limit)
            out.append(d)
        return out[0], out[1]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "limit": self.limit, "values_clamped": self.values_clamped}


_BY_NAME: dict[str, Callable[[], Filter]] = {"drop_massive": DropMassiveRows, "clamp": Clamp}


def resolve_filters(spec: str | Filter | Iterable[str | Filter] | None) -> list[Filter]:
    """None or () -> no filter; names ("drop_massive", "clamp") -> default instances; callables as is."""
    if spec is None:
        return []
    if isinstance(spec, str) or callable(spec):
        spec = [spec]
    out: list[Filter] = []
    for f in spec:
        if isinstance(f, str):
            if f not in _BY_NAME:
                raise ValueError(
                    f"unknown filter {f!r}; known: {sorted(_BY_NAME)} or a callable (acts_a, acts_b) -> (acts_a, acts_b)"
                )
            out.append(_BY_NAME[f]())
        elif callable(f):
            out.append(f)
        else:
            raise TypeError(f"filters must be names or callables, got {type(f).__name__}")
    return out


def describe(f: Filter) -> dict[str, Any] | str:
    d = getattr(f, "describe", None)
    return d() if callable(d) else repr(f)
