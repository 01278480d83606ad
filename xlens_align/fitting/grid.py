"""Maps fitted from one streamed pass over a pair: every (point of A, point of B) pair at once.

>>> maps = fit_grid(pair, texts, ["resid_post.8", "resid_post.12"], ["resid_post.6", "resid_post.9"],
...                 kind="affine", alpha="cv", val_texts=val, drop_first=1)
>>> maps["resid_post.12", "resid_post.9"].score(X, Y)

Both models run once per batch of texts (`activations.accumulate`); the float64 statistics of
every requested pair land in one `StatsGrid`, and each map is solved from its `CrossStats`
(`fit_stats`), so the result equals fitting each pair on its concatenated raw activations.
`provenance` is the record every map fitted from a `ModelPair` carries (`AlignmentMap.bind`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..activations import accumulate, collect_all, resolve_points
from ..files import split_indices
from ..maps import CCA, Affine, AlignmentMap, LinearMap, LowRank, Procrustes
from ..points import Point
from ..rows import RowFilter
from ..validate import check_texts, positive_int

__all__ = ["GRID_KINDS", "fit_grid", "fit_maps", "provenance"]

GRID_KINDS: dict[str, type[LinearMap]] = {
    "affine": Affine,
    "procrustes": Procrustes,
    "lowrank": LowRank,
    "low_rank": LowRank,
    "cca": CCA,
}
"""Map kinds `fit_grid` accepts (closed forms in the second moments)."""


def _bridge_mode(pair: Any) -> str:
    ma, mb = str(pair.a.bridge_mode), str(pair.b.bridge_mode)
    return ma if ma == mb else f"{ma}/{mb}"


def provenance(
    pair: Any, source: Point, target: Point, rows: RowFilter, *, policy: str = "last", overflow: str = "error"
) -> dict[str, Any]:
    """The provenance keywords of a map fitted on `pair` from A's `source` to B's `target` (for
    ``m.bind(a=pair.a, b=pair.b, **provenance(...))``): canonical point names, the pooling
    policy (``alignment``), the row filters and overflow rule (``positions``) and the bridges'
    mode (one word when both agree, else ``"A/B"``)."""
    return {
        "source": source.name,
        "target": target.name,
        "alignment": str(policy),
        "positions": {**rows.describe(), "overflow": str(overflow)},
        "bridge_mode": _bridge_mode(pair),
    }


def _prototype(kind: str | LinearMap, map_params: dict[str, Any]) -> LinearMap:
    if isinstance(kind, LinearMap):
        if map_params:
            raise TypeError(
                f"fit_grid got a {type(kind).__name__} instance and hyper-parameters {sorted(map_params)}: "
                "configure the instance instead"
            )
        if type(kind) not in GRID_KINDS.values():
            raise ValueError(f"kind must be one of {sorted(GRID_KINDS)} or an instance of one of them")
        return kind
    if isinstance(kind, str) and kind in GRID_KINDS:
        cls = GRID_KINDS[kind]
        try:
            return cls(**map_params)
        except TypeError as e:
            raise TypeError(f"fit_grid(kind={kind!r}): bad hyper-parameter for {cls.__name__}: {e}") from None
    raise ValueError(f"kind must be one of {sorted(GRID_KINDS)} or an unfitted instance, got {kind!r}")


def fit_grid(
    pair: Any,
    texts: Sequence[str],
    sources: Sequence[str] | str,
    targets: Sequence[str] | str,
    kind: str | LinearMap = "affine",
    *,
    val_texts: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 8,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    policy: str = "last",
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
    **map_params: Any,
) -> dict[tuple[str, str], AlignmentMap]:
    """Fit one `kind` map per (source point of A, target point of B) from one streamed pass.

    Args:
        pair: a `ModelPair`; texts: training texts.
        sources / targets: points of A / B; every combination is fitted, or only `pairs` (a list
            of (source, target) among them) when given.
        kind: ``"affine"``, ``"procrustes"``, ``"lowrank"`` (alias ``"low_rank"``) or ``"cca"``;
            or an unfitted instance of one of them, whose hyper-parameters are used.
        val_texts: held-out texts. With ``alpha="cv"`` (Affine) their statistics choose the ridge
            penalty (a second `StatsGrid`); without them a seeded `cv_fraction` of `texts` (by
            text, never splitting one) is held out for it. Other kinds do not use them.
        batch_size, drop_first, massive, clamp, policy, max_length, overflow, progress: as in
            `activations.collect` (the row filters are `rows.RowFilter`'s).
        **map_params: the map's hyper-parameters (``alpha=``, ``rank=``, ``k=``, ``scale=``, ...).

    Returns:
        ``{(source, target): fitted map}`` keyed by canonical point names (``resid_post.-1``
        becomes ``resid_post.{L-1}``), each map bound to the pair's model ids and config hashes
        with the points, alignment policy, row filters, bridge mode and library version.
    """
    texts = check_texts(texts)
    proto = _prototype(kind, map_params)
    rows = RowFilter(drop_first=drop_first, massive=massive, clamp=clamp)
    src = resolve_points(pair.a, sources, "sources")
    tgt = resolve_points(pair.b, targets, "targets")
    if pairs is not None:
        wanted = []
        for s, t in pairs:
            cell = (pair.a.point(s), pair.b.point(t))
            if cell[0] not in src or cell[1] not in tgt:
                raise ValueError(f"pairs: ({s!r}, {t!r}) is not among sources x targets")
            wanted.append(cell)
    else:
        wanted = [(s, t) for s in src for t in tgt]
    cv = isinstance(proto, Affine) and proto.alpha == "cv"
    train_texts = texts
    if cv and val_texts is None:
        if len(texts) < 2:
            raise ValueError(
                "alpha='cv' without val_texts holds out some of `texts` to choose alpha: give at least 2 "
                "texts or pass val_texts="
            )
        tr, va = split_indices(len(texts), proto.cv_fraction, proto.seed, "cv_fraction")
        train_texts, val_texts = [texts[i] for i in tr.tolist()], [texts[i] for i in va.tolist()]
    kw = dict(
        batch_size=positive_int(batch_size, "batch_size"), drop_first=rows.drop_first, massive=rows.massive,
        clamp=rows.clamp, policy=policy, max_length=max_length, overflow=overflow, progress=progress,
    )  # fmt: skip
    names = [(s.name, t.name) for s, t in wanted]
    grid = accumulate(pair, train_texts, src, tgt, pairs=names, **kw)
    val_grid = None
    if cv:
        val_texts = check_texts(val_texts, "val_texts")
        try:
            val_grid = accumulate(pair, val_texts, src, tgt, pairs=names, **kw)
        except ValueError as e:  # collect's messages say "texts": these are the validation texts
            raise ValueError(f"val_texts (statistics that choose alpha): {e}") from None
    out: dict[tuple[str, str], AlignmentMap] = {}
    for (s, t), key in zip(wanted, names, strict=True):
        m = type(proto)(**proto.get_params())
        if cv:
            m.fit_stats(grid[key], val_stats=val_grid[key])
        else:
            m.fit_stats(grid[key])
        m.bind(a=pair.a, b=pair.b, **provenance(pair, s, t, rows, policy=policy, overflow=overflow))
        out[key] = m
    return out


def fit_maps(
    pair: Any,
    fns: Mapping[tuple[Point, Point], Callable | type],
    texts: Sequence[str],
    *,
    batch_size: int,
    rows: RowFilter,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
) -> dict[tuple[Point, Point], Any]:
    """Fit ``fns[(s, t)]`` on the paired rows (policy "last", filtered by `rows`) of `texts`: each
    value is a map class (fit as ``cls().fit(X, Y)``) or a function ``fit(X, Y) -> map``. One
    streamed pass collects every source and target; fitted `AlignmentMap`s are bound (provenance)."""
    texts = check_texts(texts, "fit_texts")
    try:
        data = collect_all(
            pair, texts, list(dict.fromkeys(s for s, _ in fns)), list(dict.fromkeys(t for _, t in fns)),
            batch_size=batch_size, policy="last", drop_first=rows.drop_first, massive=rows.massive,
            clamp=rows.clamp, max_length=max_length, overflow=overflow, progress=progress,
        )  # fmt: skip
    except ValueError as e:  # collect's messages say "texts": these are the texts the maps are fit on
        raise ValueError(f"fit_texts (rows the maps are fit on): {e}") from None
    fitted = {}
    for (s, t), fn in fns.items():
        X, Y = data.a[s.name], data.b[t.name]
        m = fn().fit(X, Y) if isinstance(fn, type) else fn(X, Y)
        if isinstance(m, type) or not callable(getattr(m, "transform", None)):
            raise TypeError(f"the fit function for ({s}, {t}) returned {type(m).__name__}, not a fitted map")
        if isinstance(m, AlignmentMap):
            m.bind(a=pair.a, b=pair.b, **provenance(pair, s, t, rows, overflow=overflow))
        fitted[s, t] = m
    return fitted
