"""Fit closed-form maps between many (point of A, point of B) pairs from one streamed pass.

>>> maps = fit_grid(pair, texts, ["resid_post.8", "resid_post.12"], ["resid_post.6", "resid_post.9"],
...                 kind="affine", alpha="cv", val_texts=val, drop_first=1)
>>> maps["resid_post.12", "resid_post.9"].score(X, Y)

Both models run once per batch of texts (`activations.accumulate`); the float64 statistics of
every requested pair land in one `StatsGrid`, and each map is solved from its `CrossStats`
(`fit_stats`), so the result equals fitting each pair on its concatenated raw activations.

`provenance` builds the provenance record every map fitted from a `ModelPair` carries (see
`AlignmentMap.bind`); the trained adapter and the embedding injection use it too.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from typing import Any

from xlens_align.activations import accumulate, collect
from xlens_align.maps.base import AlignmentMap
from xlens_align.maps.linear import CCA, Affine, LinearMap, LowRank, Procrustes

__all__ = ["GRID_KINDS", "fit_grid", "provenance", "split_collect_kw"]

GRID_KINDS: dict[str, type[LinearMap]] = {
    "affine": Affine,
    "procrustes": Procrustes,
    "lowrank": LowRank,
    "low_rank": LowRank,
    "cca": CCA,
}
"""Map kinds `fit_grid` accepts (closed forms in the second moments)."""

_COLLECT_KEYS = frozenset(
    p.name for p in inspect.signature(collect).parameters.values() if p.kind is p.KEYWORD_ONLY
)


def split_collect_kw(kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword arguments into (those of `activations.collect`, the rest)."""
    collect_kw = {k: v for k, v in kw.items() if k in _COLLECT_KEYS}
    rest = {k: v for k, v in kw.items() if k not in _COLLECT_KEYS}
    return collect_kw, rest


def _bridge_mode(pair: Any) -> str:
    ma, mb = str(pair.a.bridge_mode), str(pair.b.bridge_mode)
    return ma if ma == mb else f"{ma}/{mb}"


def provenance(pair: Any, source: str, target: str, **collect_kw: Any) -> dict[str, Any]:
    """The provenance keywords of a map fitted on `pair` from A's `source` to B's `target` (for
    ``m.bind(a=pair.a, b=pair.b, **provenance(...))``).

    ``source``/``target`` are canonical point names (negative layers resolved); ``alignment`` is
    the pooling policy; ``positions`` the row filters (BOS always excluded, ``drop_first``,
    ``outlier_factor``, ``clamp``, ``overflow``); ``bridge_mode`` the bridges' mode (one word when
    both agree, else ``"A/B"``).
    """
    return {
        "source": pair.a.point(source).name,
        "target": pair.b.point(target).name,
        "alignment": str(collect_kw.get("policy", "last")),
        "positions": {
            "bos": "excluded",
            "drop_first": int(collect_kw.get("drop_first", 0) or 0),
            "outlier_factor": collect_kw.get("outlier_factor"),
            "clamp": collect_kw.get("clamp"),
            "overflow": str(collect_kw.get("overflow", "error")),
        },
        "bridge_mode": _bridge_mode(pair),
    }


def _points(points: Sequence[str] | str, name: str) -> list[str]:
    if isinstance(points, str):
        points = [points]
    if not isinstance(points, Sequence) or not points:
        raise ValueError(f"{name} must name at least one point, got {points!r}")
    out = list(dict.fromkeys(points))
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{name} must hold point names (str), got {p!r}")
    return out


def fit_grid(
    pair: Any,
    texts: Sequence[str],
    source_points: Sequence[str] | str,
    target_points: Sequence[str] | str,
    kind: str | LinearMap = "affine",
    val_texts: Sequence[str] | None = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    **kw: Any,
) -> dict[tuple[str, str], AlignmentMap]:
    """Fit one `kind` map per (source point of A, target point of B) from one streamed pass.

    Args:
        pair: a `ModelPair`.
        texts: training texts.
        source_points / target_points: point names of A / B; every combination is fitted, or
            only `pairs` (a list of (source, target) among them) when given.
        kind: ``"affine"``, ``"procrustes"``, ``"lowrank"`` (alias ``"low_rank"``) or ``"cca"``;
            or an unfitted instance of one of them, whose hyper-parameters are used (the way to
            give a map its own ``clamp=(lo, hi)``: a ``clamp=`` keyword goes to `collect`).
        val_texts: held-out texts. With ``alpha="cv"`` (Affine) their statistics choose the ridge
            penalty (a second `StatsGrid`); without them a seeded `cv_fraction` of `texts` (by
            text, never splitting one) is held out for it. Other kinds do not use them.
        **kw: `activations.collect`'s options (``batch_size``, ``drop_first``, ``outlier_factor``,
            ``clamp``, ``policy``, ``max_length``, ``overflow``, ``progress``) and the map's
            hyper-parameters (``alpha=``, ``rank=``, ``k=``, ``scale=``, ``standardize=``, ...).

    Returns:
        ``{(source, target): fitted map}`` keyed by the names as given, each map bound to the
        pair's model ids and config hashes with the points, alignment policy, position filters,
        bridge mode and library version.
    """
    collect_kw, map_kw = split_collect_kw(kw)
    if isinstance(kind, LinearMap):
        if map_kw:
            raise TypeError(
                f"fit_grid got a {type(kind).__name__} instance and hyper-parameters {sorted(map_kw)}: "
                "configure the instance instead"
            )
        if type(kind) not in GRID_KINDS.values():
            raise ValueError(f"kind must be one of {sorted(GRID_KINDS)} or an instance of one of them")
        proto: LinearMap = kind
    elif isinstance(kind, str) and kind in GRID_KINDS:
        cls = GRID_KINDS[kind]
        try:
            proto = cls(**map_kw)
        except TypeError as e:
            raise TypeError(f"fit_grid(kind={kind!r}): bad hyper-parameter for {cls.__name__}: {e}") from None
    else:
        raise ValueError(f"kind must be one of {sorted(GRID_KINDS)} or an unfitted instance, got {kind!r}")
    return _fit_grid(pair, texts, source_points, target_points, proto, val_texts, pairs, collect_kw)


def _fit_grid(
    pair: Any,
    texts: Sequence[str],
    source_points: Sequence[str] | str,
    target_points: Sequence[str] | str,
    proto: LinearMap,
    val_texts: Sequence[str] | None,
    pairs: Sequence[tuple[str, str]] | None,
    collect_kw: dict[str, Any],
) -> dict[tuple[str, str], AlignmentMap]:
    collect_kw = {"progress": False, **collect_kw}
    src, tgt = _points(source_points, "source_points"), _points(target_points, "target_points")
    if pairs is not None:
        pairs = [tuple(p) for p in pairs]
        for s, t in pairs:
            if s not in src or t not in tgt:
                raise ValueError(f"pair ({s!r}, {t!r}) is not among source_points x target_points")
    wanted = list(pairs) if pairs is not None else [(s, t) for s in src for t in tgt]
    cls = type(proto)
    params = proto.get_params()
    cv = isinstance(proto, Affine) and proto.alpha == "cv"
    train_texts = texts
    if cv and val_texts is None:
        train_texts, val_texts = _split_texts(texts, proto.cv_fraction, proto.seed)
    grid = accumulate(pair, train_texts, src, tgt, pairs=wanted, **collect_kw)
    val_grid = accumulate(pair, val_texts, src, tgt, pairs=wanted, **collect_kw) if cv else None
    out: dict[tuple[str, str], AlignmentMap] = {}
    for s, t in wanted:
        m = cls(**params)
        if cv:
            m.fit_stats(grid[s, t], val_stats=val_grid[s, t])
        else:
            m.fit_stats(grid[s, t])
        m.bind(a=pair.a, b=pair.b, **provenance(pair, s, t, **collect_kw))
        out[s, t] = m
    return out


def _split_texts(texts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if isinstance(texts, str) or len(texts) < 2:
        raise ValueError(
            "alpha='cv' without val_texts holds out some of `texts` to choose alpha: give at least 2 texts "
            "or pass val_texts="
        )
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"cv_fraction must be in (0, 1), got {fraction!r}")
    n = len(texts)
    n_val = min(max(1, round(fraction * n)), n - 1)
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    return [t for i, t in enumerate(texts) if i not in val_idx], [texts[i] for i in sorted(val_idx)]
