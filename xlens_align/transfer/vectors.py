"""Steering vectors: find one in a model, carry it through a map, add it to a residual stream.

>>> v = steering_vector(a, pos_texts, neg_texts, "resid_post.19")            # A's direction
>>> w = transfer_direction(m, v, norms=(activation_norm(a, texts, "resid_post.19"),
...                                      activation_norm(b, texts, "resid_post.6")))
>>> with steer(b, "resid_post.6", w, alpha=4.0):
...     logits = b.forward(ids, mask)

A steering vector is a difference of means of pooled activations (`pooled`). A linear map
(`maps.LinearMap` without winsorizing: ``Y = X W + b``) carries a direction exactly, ``w = v W``;
any other map (anything with ``transform``) carries it as the mean of ``map(x + v) - map(x)``
over given rows of A. With ``norms=(s_A, s_B)`` (typical per-token norms at the source and the
target, `activation_norm`) the result is rescaled to ``|w| = |v| s_B / s_A``: the vector keeps
its size relative to the stream it is added to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from xlens_align.maps.linear import LinearMap
from xlens_align.patching import Positions, patch
from xlens_align.validate import (
    check_finite,
    check_matrix,
    check_texts,
    finite_float,
    nonneg_int,
    positive_float,
    positive_int,
)

__all__ = [
    "REDUCTIONS",
    "activation_norm",
    "batches",
    "check_vector",
    "linear_part",
    "pooled",
    "steer",
    "steering_vector",
    "transfer_direction",
]

REDUCTIONS = ("mean", "last")
"""How `pooled` turns a text's positions into one row: the mean over positions, or the last token."""


def batches(
    model: Any, texts: Sequence[str], batch_size: int, progress: bool, desc: str
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(input_ids, attention_mask)`` of `texts` in batches (`model.to_tokens`), with a tqdm bar."""
    texts = check_texts(texts)
    batch_size = positive_int(batch_size, "batch_size")
    for s in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        yield model.to_tokens(texts[s : s + batch_size])


def _kept(mask: Tensor, drop_first: int) -> Tensor:
    """Real (non-pad) positions at or after `drop_first`, as a float [b, t] mask."""
    keep = mask.bool().clone()
    keep[:, :drop_first] = False
    return keep.to(torch.float64)


def pooled(
    model: Any,
    texts: Sequence[str],
    point: str,
    *,
    reduce: str = "mean",
    drop_first: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> Float[Tensor, "n d"]:
    """One float64 row per text of `model`'s stream at `point`: the mean over the text's tokens
    from position `drop_first` on (``reduce="mean"``; the first tokens carry massive activations),
    or its last token (``reduce="last"``)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    drop_first = nonneg_int(drop_first, "drop_first")
    pt = model.point(point)
    out = []
    for ids, mask in batches(model, texts, batch_size, progress, f"pool {pt.name}"):
        _, acts = model.run_with_points(ids, mask, [pt])
        x = acts[pt].detach().to(torch.float64)
        if reduce == "last":
            out.append(x[torch.arange(x.shape[0]), mask.sum(1) - 1])
            continue
        keep = _kept(mask, drop_first)
        if (keep.sum(1) == 0).any():
            raise ValueError(
                f"a text has no tokens left after drop_first={drop_first} (texts of "
                f"{mask.sum(1).min().item()} tokens): use longer texts or a smaller drop_first"
            )
        out.append((x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))
    rows = torch.cat(out)
    check_finite(rows, f"activations at {pt.name!r}")
    return rows.cpu()


def steering_vector(
    model: Any,
    positive_texts: Sequence[str],
    negative_texts: Sequence[str],
    point: str,
    **pooled_kw: Any,
) -> Float[Tensor, " d"]:
    """Difference of means at `point`: mean pooled row of `positive_texts` minus that of
    `negative_texts` (float64, on the CPU; `pooled`'s keywords pass through)."""
    pos = pooled(model, check_texts(positive_texts, "positive_texts"), point, **pooled_kw)
    neg = pooled(model, check_texts(negative_texts, "negative_texts"), point, **pooled_kw)
    return pos.mean(0) - neg.mean(0)


def activation_norm(
    model: Any,
    texts: Sequence[str],
    point: str,
    *,
    drop_first: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """The typical scale of `model`'s stream at `point`: the median L2 norm of its per-token rows
    over `texts` (positions from `drop_first` on; float64)."""
    drop_first = nonneg_int(drop_first, "drop_first")
    pt = model.point(point)
    norms = []
    for ids, mask in batches(model, texts, batch_size, progress, f"norm {pt.name}"):
        _, acts = model.run_with_points(ids, mask, [pt])
        keep = _kept(mask, drop_first).bool()
        norms.append(acts[pt].detach().to(torch.float64)[keep].norm(dim=-1).cpu())
    n = torch.cat(norms)
    if n.numel() == 0:
        raise ValueError(f"no tokens left after drop_first={drop_first}: use longer texts")
    return float(n.median())


def check_vector(v: Any, d: int, name: str) -> Float[Tensor, " d"]:
    """`v` must be a finite 1-D float tensor of length `d`."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{d}], got {type(v).__name__}")
    if v.ndim != 1 or v.shape[0] != d:
        raise ValueError(f"{name} must have shape [{d}], got {tuple(v.shape)}")
    check_finite(v, name)
    return v


def linear_part(map: Any) -> tuple[Tensor, Tensor] | None:
    """``(W [d_A, d_B], b [d_B])`` in float64 when `map` is exactly ``x W + b`` (a fitted
    `LinearMap` without winsorizing), else None."""
    if isinstance(map, LinearMap) and map.is_fitted and map.prep_x_.winsor_lo is None:
        return map.weight_.to(torch.float64).cpu(), map.bias_.to(torch.float64).cpu()
    return None


def transfer_direction(
    map: Any,
    v: Float[Tensor, " d_a"],
    *,
    rows: Float[Tensor, "n d_a"] | None = None,
    norms: tuple[float, float] | None = None,
) -> Float[Tensor, " d_b"]:
    """B's direction (float64, CPU) for A's direction `v` through `map`.

    Linear maps: ``v W`` exactly (`linear_part`). Other maps: the mean over `rows` (A's rows at
    the map's source point, required) of ``map(x + v) - map(x)``. ``norms=(s_A, s_B)`` rescales
    the result to ``|v| s_B / s_A`` (see `activation_norm`); None keeps the map's own output.
    """
    if not callable(getattr(map, "transform", None)):
        raise TypeError(f"map must have a transform method, got {type(map).__name__}")
    if not isinstance(v, Tensor) or v.ndim != 1:
        raise ValueError(f"v must be a 1-D tensor (a direction in A), got {getattr(v, 'shape', v)!r}")
    check_finite(v, "v")
    v = v.to(torch.float64).cpu()
    lin = linear_part(map)
    if lin is not None:
        w = check_vector(v, lin[0].shape[0], "v") @ lin[0]
    else:
        if rows is None:
            raise ValueError(
                f"{type(map).__name__} is not a linear map: pass rows=A's rows at the source point "
                "to average map(x + v) - map(x) over"
            )
        X = check_matrix(rows, "rows", min_rows=1).to(torch.float64)
        check_vector(v, X.shape[1], "v")
        dv = v.to(X.device)
        w = (map.transform(X + dv).to(torch.float64) - map.transform(X).to(torch.float64)).mean(0).cpu()
    if norms is not None:
        if not isinstance(norms, tuple | list) or len(norms) != 2:
            raise TypeError(f"norms must be a pair (s_A, s_B) of typical norms, got {norms!r}")
        s_a, s_b = positive_float(norms[0], "norms[0]"), positive_float(norms[1], "norms[1]")
        if float(w.norm()) == 0.0:
            raise ValueError("the map sends v to the zero vector: there is no direction to rescale")
        w = w * (float(v.norm()) * s_b / s_a / float(w.norm()))
    check_finite(w, "transferred direction")
    return w


def _adder(delta: Tensor, positions: Positions) -> Any:
    """A patch function adding `delta` at `positions` (see `patching.Positions`)."""

    def add(x: Tensor) -> Tensor:
        if positions is None:
            return x + delta
        out = x.clone()
        if isinstance(positions, tuple):
            out[positions[0], positions[1]] += delta
        elif positions.dtype == torch.bool:
            if positions.shape != x.shape[:2]:
                raise ValueError(
                    f"positions mask shape {tuple(positions.shape)} != stream shape {tuple(x.shape[:2])}"
                )
            out[positions] += delta
        else:
            out[:, positions] += delta
        return out

    return add


@contextlib.contextmanager
def steer(
    model: Any,
    point: str,
    vector: Float[Tensor, " d"],
    alpha: float = 1.0,
    positions: Positions = None,
) -> Iterator[Any]:
    """While open, forward passes of `model` get ``alpha * vector`` added to the stream at `point`:
    at every position (None), or at `positions` (a LongTensor of positions, a ``(batch_idx,
    pos_idx)`` pair or a bool mask [batch, pos]). Built on `patching.patch`."""
    alpha = finite_float(alpha, "alpha")
    vector = check_vector(vector, model.d_model, "vector")
    pos = positions
    if pos is not None and not isinstance(pos, Tensor | tuple):
        raise TypeError(
            f"positions must be None, a LongTensor, a (batch_idx, pos_idx) pair or a bool mask, "
            f"got {type(pos).__name__}"
        )
    if isinstance(pos, tuple):
        pos = tuple(t.to(model.device) for t in pos)
    elif isinstance(pos, Tensor):
        pos = pos.to(model.device)
    delta = (alpha * vector.to(torch.float64)).to(device=model.device, dtype=model.dtype)
    with patch(model, point, _adder(delta, pos), positions=None) as m:
        yield m
