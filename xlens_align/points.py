"""Uniform names for residual-stream points, whatever the architecture.

A model with L blocks has these points, in forward order::

    embed, resid_pre.0, resid_mid.0, resid_post.0, resid_pre.1, ..., resid_post.{L-1}, final

``embed`` is the embedding output (what enters block 0: equal to ``resid_pre.0`` for the
families supported here), ``resid_mid.l`` the stream between attention and MLP of block l,
and ``final`` the stream after the final norm. Negative layers count from the end
(``resid_post.-1`` is the last block's output). Each point names one TransformerLens hook of a
`TransformerBridge`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "spaced_points",
    "KINDS",
    "Point",
    "all_points",
    "forward_stop",
    "hook_name",
    "parse_point",
    "point_at_depth",
]

KINDS = ("resid_pre", "resid_mid", "resid_post")
_HOOKS = {
    "embed": "hook_embed",
    "final": "ln_final.hook_out",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
}
_RE = re.compile(r"^(resid_pre|resid_mid|resid_post)\.(-?\d+)$")


@dataclass(frozen=True, order=False)
class Point:
    """A resolved residual point: kind in {'embed', 'final', *KINDS} and a non-negative layer."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"

    def depth(self, n_layers: int) -> float:
        """Position along the forward pass, for sorting: embed=0 < ... < final."""
        if self.kind == "embed":
            return 0.0
        if self.kind == "final":
            return 3.0 * n_layers + 1.0
        return 3.0 * self.layer + 1.0 + KINDS.index(self.kind)

    def hook_name(self) -> str:
        return _HOOKS[self.kind].format(layer=self.layer)

    def __str__(self) -> str:
        return self.name


def all_points(n_layers: int) -> list[str]:
    """All point names of a model with `n_layers` blocks, in forward order."""
    _check_n_layers(n_layers)
    return ["embed", *(f"{k}.{layer}" for layer in range(n_layers) for k in KINDS), "final"]


def _check_n_layers(n_layers: int) -> None:
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")


def parse_point(point: str | Point, n_layers: int) -> Point:
    """Resolve a point name (negative layers allowed) for a model with `n_layers` blocks.

    A `Point` is range-checked and returned as it is (a new one only when its layer is negative):
    names are parsed once and `Point` objects flow on. Raises ValueError listing the valid names
    for an unknown point and the valid range for a layer out of range.
    """
    _check_n_layers(n_layers)
    if isinstance(point, Point):
        if point.kind in ("embed", "final") and point.layer is None:
            return point
        if point.kind in KINDS and isinstance(point.layer, int) and not isinstance(point.layer, bool):
            return _resolve_layer(point.kind, point.layer, point.name, n_layers, point)
        raise _unknown(point.name, n_layers)
    if not isinstance(point, str):
        raise TypeError(f"point must be a str such as 'resid_post.3', got {type(point).__name__}")
    if point in ("embed", "final"):
        return Point(point)
    m = _RE.match(point)
    if m is None:
        raise _unknown(point, n_layers)
    return _resolve_layer(m.group(1), int(m.group(2)), point, n_layers)


def _unknown(name: str, n_layers: int) -> ValueError:
    valid = all_points(n_layers)
    shown = ", ".join(valid[:7] + ["...", *valid[-3:]]) if len(valid) > 12 else ", ".join(valid)
    return ValueError(
        f"unknown point {name!r}; valid points are 'embed', 'final' and "
        f"'resid_pre.L' / 'resid_mid.L' / 'resid_post.L' with -{n_layers} <= L < {n_layers}: {shown}"
    )


def _resolve_layer(kind: str, layer: int, name: str, n_layers: int, given: Point | None = None) -> Point:
    """`Point(kind, layer)`, a negative layer counted from the end; `given` itself when it is that point."""
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer {layer} of point {name!r} is out of range for a model with {n_layers} layers "
            f"(valid: {-n_layers}..{n_layers - 1})"
        )
    if given is not None and layer >= 0:
        return given
    return Point(kind, layer % n_layers)


def hook_name(point: str | Point, n_layers: int) -> str:
    """The TransformerBridge hook name of `point`."""
    return parse_point(point, n_layers).hook_name()


def point_at_depth(n_layers: int, fraction: float, kind: str = "resid_post") -> str:
    """The `kind` point of the block at relative depth `fraction` in [0, 1].

    0 is the first block, 1 the last (e.g. ``point_at_depth(32, 0.5) == 'resid_post.16'``).
    `kind` may also be 'embed' or 'final', which ignore `fraction`.
    """
    _check_n_layers(n_layers)
    if not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if kind in ("embed", "final"):
        return kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {('embed', *KINDS, 'final')}, got {kind!r}")
    layer = min(n_layers - 1, int(round(float(fraction) * (n_layers - 1))))
    return f"{kind}.{layer}"


def spaced_points(n_layers: int, k: int, kind: str = "resid_post") -> list[str]:
    """`k` `kind` points evenly spaced over depth, first block to last (fewer when two fractions
    land on the same block): ``[point_at_depth(n_layers, i / (k - 1), kind) for i in range(k)]``."""
    _check_n_layers(n_layers)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of points) must be a positive int, got {k!r}")
    fractions = [0.0] if k == 1 else [i / (k - 1) for i in range(k)]
    return list(dict.fromkeys(point_at_depth(n_layers, f, kind) for f in fractions))


def forward_stop(points: Iterable[Point], n_layers: int) -> tuple[int | None, Point]:
    """Where a forward pass that only has to reach `points` may end: ``(stop_at_layer, deepest)``.

    TransformerBridge's ``stop_at_layer=k`` runs blocks 0..k-1 and skips the final norm and the
    unembedding, so a pass that needs ``resid_post.5`` at most stops at 6. When the deepest point
    is ``embed``, in the last block or ``final``, `stop_at_layer` is None: the pass is then ended
    from the hook of `deepest` (which still skips the unembedding).
    """
    points = list(points)
    if not points:
        raise ValueError("points must name at least one residual point")
    deepest = max(points, key=lambda p: p.depth(n_layers))
    if deepest.kind in ("embed", "final") or deepest.layer == n_layers - 1:
        return None, deepest
    return deepest.layer + 1, deepest
