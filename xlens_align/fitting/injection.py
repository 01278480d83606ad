"""Fitting the embedding-injection baseline: A's `source` point mapped into B's input embeddings.

The map is fitted like its base map on pairs (X = A's `source`, Y = B's ``"embed"`` point) and
applied at B's ``"embed"`` point (see `maps.EmbeddingInjection`). Closed-form bases stream
statistics (`fit_grid`); other bases (an MLP) train on the collected rows.

>>> inj = fit_injection(pair, source="resid_post.10", texts=texts, base="affine", alpha="cv")
>>> xa.effects.measure(pair, inj, source="resid_post.10", target="embed", texts=held_out)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..activations import collect_all
from ..maps import AlignmentMap, EmbeddingInjection
from ..rows import RowFilter
from ..validate import check_texts
from .grid import GRID_KINDS, fit_grid, provenance

__all__ = ["fit_injection"]

EMBED = "embed"


def fit_injection(
    pair: Any,
    *,
    source: str,
    texts: Sequence[str],
    val_texts: Sequence[str] | None = None,
    base: str | AlignmentMap = "affine",
    batch_size: int = 8,
    drop_first: int = 0,
    massive: float | None = None,
    clamp: float | None = None,
    max_length: int | tuple[int, int] | None = None,
    overflow: str = "error",
    progress: bool = False,
    **base_params: Any,
) -> EmbeddingInjection:
    """Fit an `EmbeddingInjection` from A's `source` to B's ``"embed"`` point on `texts`.

    `base`: a map kind or an unfitted map whose hyper-parameters are used; `base_params`: the
    kind's hyper-parameters (e.g. ``alpha="cv"``). `val_texts` choose Affine's alpha with
    ``alpha="cv"``. The row filters and options are `fit_grid`'s. The result carries provenance
    with target ``"embed"``.
    """
    texts = check_texts(texts)
    inj = EmbeddingInjection(base, base_params or None)
    proto = inj.make_base()
    rows = RowFilter(drop_first=drop_first, massive=massive, clamp=clamp)
    kw = dict(
        batch_size=batch_size, drop_first=rows.drop_first, massive=rows.massive, clamp=rows.clamp,
        max_length=max_length, overflow=overflow, progress=progress,
    )  # fmt: skip
    src = pair.a.point(source)
    if proto.kind in GRID_KINDS:
        fitted = fit_grid(pair, texts, [src], [EMBED], kind=proto, val_texts=val_texts, **kw)
        inj.fit_from(fitted[src.name, EMBED])
    else:
        data = collect_all(pair, texts, [src], [EMBED], policy="last", **kw)
        inj.fit(data.a[src.name], data.b[EMBED])
    inj.bind(a=pair.a, b=pair.b, **provenance(pair, src, pair.b.point(EMBED), rows, overflow=overflow))
    return inj
