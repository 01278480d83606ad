"""A logit lens across tokenizers: what B would predict from A's state.

A map fit from a point of A to B's ``final`` point (B's stream after its final norm) sends A's
rows into the space B's unembedding reads; B's unembedding then gives logits over B's
vocabulary. Beside it, A's own logit lens: A's final norm and unembedding applied to the same
point (at ``final`` that is A's own logits).

>>> m = xa.maps.Affine(alpha="cv").fit(X_a_point, Y_b_final)      # rows from xa.collect
>>> view = cross_lens(a, b, m, ["The capital of France is"], "resid_post.19", k=5)
>>> print(view.text())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from xlens_align.transfer.vectors import batches
from xlens_align.validate import positive_int

__all__ = ["LensView", "cross_lens", "cross_logits", "lens_logits", "own_lens", "unembed"]


def unembed(model: Any, x: Float[Tensor, "... d"]) -> Float[Tensor, "... vocab"]:
    """`model`'s unembedding (the bridge's) applied to rows already through its final norm."""
    with torch.no_grad():
        return model.bridge.unembed(x.to(device=model.device, dtype=model.dtype))


def lens_logits(model: Any, x: Float[Tensor, "... d"], point: str) -> Float[Tensor, "... vocab"]:
    """`model`'s logit lens at `point`: its final norm (skipped at ``final``) and unembedding."""
    if model.point(point).kind == "final":
        return unembed(model, x)
    with torch.no_grad():
        return unembed(model, model.bridge.ln_final(x.to(device=model.device, dtype=model.dtype)))


def _read(model: Any, ids: Tensor, mask: Tensor, point: str) -> Float[Tensor, "batch pos d"]:
    pt = model.point(point)
    with torch.no_grad():
        _, acts = model.run_with_points(ids, mask, [pt])
    return acts[pt]


def own_lens(model: Any, ids: Tensor, mask: Tensor, point: str) -> Float[Tensor, "batch pos vocab"]:
    """`lens_logits` of `model`'s own stream at `point` on one batch of tokens."""
    return lens_logits(model, _read(model, ids, mask, point), point)


def _check_map(map: Any, a: Any, b: Any) -> None:
    if not callable(getattr(map, "transform", None)):
        raise TypeError(f"map must have a transform method, got {type(map).__name__}")
    target = getattr(map, "provenance", {}).get("target")
    if target is not None and b.point(target).kind != "final":
        raise ValueError(
            f"the cross-model lens needs a map into B's 'final' point; this map was fit into {target!r}"
        )


def cross_logits(
    a: Any, b: Any, map: Any, ids: Tensor, mask: Tensor, point: str
) -> Float[Tensor, "batch pos vocab_b"]:
    """B's logits (B's vocabulary) read from A's stream at `point` on one batch of A's tokens,
    through ``map`` (A[point] -> B['final']) and B's unembedding."""
    _check_map(map, a, b)
    return _through(b, map, _read(a, ids, mask, point))


def _through(b: Any, map: Any, x: Tensor) -> Tensor:
    """B's logits of A's rows `x` [batch, pos, d_A] sent through `map` into B's ``final``."""
    with torch.no_grad():
        y = map.transform(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)
    if y.shape[-1] != b.d_model:
        raise ValueError(f"map output has {y.shape[-1]} columns; B ({b.name}) has d_model={b.d_model}")
    return unembed(b, y)


@dataclass
class LensView:
    """Per text and position: A's token, A's own lens top-k (A's tokens) and the cross-model lens
    top-k (B's tokens), with their probabilities."""

    point: str
    tokens: list[list[str]]
    own: list[list[list[tuple[str, float]]]]
    cross: list[list[list[tuple[str, float]]]]

    def text(self, row: int = 0, width: int = 38) -> str:
        """Side-by-side table of one text."""

        def cell(top: list[tuple[str, float]]) -> str:
            return " ".join(f"{t!r}:{p:.2f}" for t, p in top)[:width]

        lines = [f"{'pos':>3}  {'A token':<14}{'A lens at ' + self.point:<{width + 2}}B via map"]
        for i, tok in enumerate(self.tokens[row]):
            lines.append(
                f"{i:>3}  {tok!r:<14}{cell(self.own[row][i]):<{width + 2}}{cell(self.cross[row][i])}"
            )
        return "\n".join(lines)


def _top(model: Any, logits: Tensor, n: int, k: int) -> list[list[tuple[str, float]]]:
    p, idx = logits[:n].float().softmax(-1).topk(k, dim=-1)
    dec = model.tokenizer.decode
    return [
        [(dec([int(t)]), float(q)) for t, q in zip(ti, pi, strict=True)]
        for ti, pi in zip(idx, p, strict=True)
    ]


def cross_lens(
    a: Any,
    b: Any,
    map: Any,
    texts: Sequence[str],
    point: str,
    *,
    k: int = 5,
    batch_size: int = 8,
    progress: bool = False,
) -> LensView:
    """A's own logit lens and the cross-model lens (`cross_logits`) at A's `point`, top `k`
    tokens per position of every text, side by side."""
    k = positive_int(k, "k")
    _check_map(map, a, b)
    tokens, own, cross = [], [], []
    for ids, mask in batches(a, texts, batch_size, progress, "lens"):
        x = _read(a, ids, mask, point)
        lo, lx = lens_logits(a, x, point), _through(b, map, x)
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            tokens.append([a.tokenizer.decode([int(t)]) for t in ids[r, :n]])
            own.append(_top(a, lo[r], n, k))
            cross.append(_top(b, lx[r], n, k))
    return LensView(a.point(point).name, tokens, own, cross)
