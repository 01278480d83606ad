"""Overwrite the residual stream of a `LensModel` at named points, through TransformerLens hooks.

>>> with xa.patch(b, "resid_post.8", values, positions=(batch_idx, pos_idx)):
...     logits = b.forward(input_ids, attention_mask)

`values` is written into the stream at the given positions; every other position is untouched.
Several points at once: pass a mapping ``{point: values}`` or ``{point: (values, positions)}``.
This module knows nothing of maps: a mapped patch computes `values` with any object that has a
`transform` method and hands them here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .points import Point

__all__ = ["Positions", "forward_patched", "patch", "patch_hooks"]

# None: every position; LongTensor [k]: these positions of every row; (batch_idx, pos_idx): these
# (row, position) cells; BoolTensor [batch, pos]: where True.
Positions = Union[None, Int[Tensor, " k"], tuple[Int[Tensor, " n"], Int[Tensor, " n"]], Bool[Tensor, "b t"]]  # noqa: UP007
Values = Union[Float[Tensor, "..."], Callable[[Tensor], Tensor]]  # noqa: UP007


def _check_values(model: Any, point: str, values: Values) -> None:
    if callable(values) and not isinstance(values, Tensor):
        return
    if not isinstance(values, Tensor):
        raise TypeError(
            f"values for point {point!r} must be a tensor or a callable, got {type(values).__name__}"
        )
    if values.ndim == 0 or values.shape[-1] != model.d_model:
        raise ValueError(
            f"values for point {point!r} have hidden size {tuple(values.shape)[-1:] or '()'}; "
            f"model {model.name!r} has d_model={model.d_model}"
        )
    if values.device != model.device:
        raise ValueError(
            f"values for point {point!r} are on {values.device}, model {model.name!r} is on {model.device}: "
            "move them with .to(model.device)"
        )
    if values.dtype != model.dtype:
        raise TypeError(
            f"values for point {point!r} have dtype {values.dtype}, model {model.name!r} runs in {model.dtype}: "
            "cast them with .to(model.dtype)"
        )
    if not torch.isfinite(values).all():
        raise ValueError(f"values for point {point!r} contain inf/NaN")


def _writer(point: str, values: Values, positions: Positions) -> Callable[[Tensor, Any], Tensor]:
    def hook(x: Tensor, hook: Any = None) -> Tensor:
        if callable(values) and not isinstance(values, Tensor):
            out = values(x)
            if not isinstance(out, Tensor) or out.shape != x.shape:
                raise ValueError(
                    f"patch function for {point!r} must return a tensor of shape {tuple(x.shape)}"
                )
            return out
        x = x.clone()
        v = values
        try:
            if positions is None:
                x[...] = v.expand_as(x) if v.shape != x.shape else v
            elif isinstance(positions, tuple):
                bi, pi = positions
                x[bi, pi] = v
            elif positions.dtype == torch.bool:
                if positions.shape != x.shape[:2]:
                    raise ValueError(
                        f"mask shape {tuple(positions.shape)} != stream shape {tuple(x.shape[:2])}"
                    )
                x[positions] = v[positions] if v.shape == x.shape else v
            else:
                x[:, positions] = v
        except (IndexError, RuntimeError) as e:
            raise ValueError(
                f"cannot write values of shape {tuple(v.shape)} into the stream at {point!r} "
                f"(stream shape {tuple(x.shape)}, positions {_describe(positions)}): {e}"
            ) from e
        return x

    return hook


def _describe(positions: Positions) -> str:
    if positions is None:
        return "all"
    if isinstance(positions, tuple):
        return f"{len(positions[0])} (row, pos) cells"
    return f"tensor{tuple(positions.shape)} {positions.dtype}"


def _check_positions(point: str, positions: Positions) -> None:
    if positions is None:
        return
    if isinstance(positions, tuple):
        if len(positions) != 2 or not all(isinstance(t, Tensor) for t in positions):
            raise TypeError(f"positions for {point!r} must be (batch_idx, pos_idx) tensors")
        if positions[0].shape != positions[1].shape or positions[0].ndim != 1:
            raise ValueError(f"positions for {point!r}: batch_idx and pos_idx must be 1-D of equal length")
        return
    if not isinstance(positions, Tensor):
        raise TypeError(
            f"positions for {point!r} must be None, a LongTensor of positions, a (batch_idx, pos_idx) "
            f"pair or a bool mask, got {type(positions).__name__}"
        )


def patch_hooks(
    model: Any,
    point: str | Point | Mapping[str, Values | tuple[Values, Positions]],
    values: Values | None = None,
    positions: Positions = None,
) -> list[tuple[str, Callable]]:
    """The (hook_name, fn) pairs that `patch` installs: for `run_with_hooks` or TransformerLens helpers."""
    specs = _specs(point, values, positions)
    hooks = []
    for key, (v, pos) in specs.items():
        pt = model.point(key)  # ValueError listing valid points; a Point passes through
        hook_name, p = pt.hook_name(), pt.name
        _check_values(model, p, v)
        _check_positions(p, pos)
        hooks.append((hook_name, _writer(p, v, pos)))
    return hooks


def _specs(point: Any, values: Values | None, positions: Positions) -> dict[Any, tuple[Values, Positions]]:
    """``{point: (values, positions)}`` from `patch`'s arguments (one point, or a mapping)."""
    if isinstance(point, Mapping):
        if values is not None:
            raise ValueError("give values inside the mapping {point: values}, not as a separate argument")
        specs = {p: (v if isinstance(v, tuple) else (v, positions)) for p, v in point.items()}
    elif isinstance(point, str | Point):
        if values is None:
            raise ValueError(f"values are required to patch {point!r}")
        specs = {point: (values, positions)}
    else:
        raise TypeError(
            f"point must be a point name or a mapping of point -> values, got {type(point).__name__}"
        )
    if not specs:
        raise ValueError("nothing to patch: the mapping of points is empty")
    return specs


@contextlib.contextmanager
def patch(
    model: Any,
    point: str | Point | Mapping[str, Values | tuple[Values, Positions]],
    values: Values | None = None,
    positions: Positions = None,
) -> Iterator[Any]:
    """Context manager: while open, forward passes of `model` see `values` written at `point`.

    A `LensModel` gets TransformerLens hooks; a model that runs elsewhere (with ``run_patched``
    and a ``writing(spec)`` context, e.g. a remote model) writes the values inside each trace
    its ``forward`` sends while the block is open."""
    hooks = patch_hooks(model, point, values, positions)  # checks points, values and positions
    if callable(getattr(model, "run_patched", None)):
        spec = {model.point(p): v for p, v in _specs(point, values, positions).items()}
        with model.writing(spec):
            yield model
        return
    with model.bridge.hooks(fwd_hooks=hooks):
        yield model


def forward_patched(
    model: Any,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    spec: Mapping[str | Point, tuple[Values, Positions]] | None = None,
) -> Float[Tensor, "batch pos vocab"]:
    """`model`'s logits with ``spec = {point: (values, positions)}`` written into its residual
    stream (None or empty: a clean forward).

    A `LensModel` gets TransformerLens hooks (`patch_hooks`). A model that runs elsewhere (a
    remote model: any object with a ``run_patched(input_ids, attention_mask, spec)`` method) gets
    the same checks on `spec` and writes the values inside its own trace.
    """
    hooks = patch_hooks(model, spec) if spec else []  # checks points, values and positions
    if callable(getattr(model, "run_patched", None)):
        return model.run_patched(
            input_ids, attention_mask, {model.point(p): v for p, v in (spec or {}).items()}
        )
    return model.forward(input_ids, attention_mask, fwd_hooks=hooks)
