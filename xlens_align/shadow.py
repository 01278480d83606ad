"""A plain Hugging Face twin of a bridged model, sharing its weights: the clean pass without hooks.

`TransformerBridge` replaces an HF model's modules in place with hooked components (every block,
attention, MLP, norm and linear), so reading the residual stream through it pays a Python hook
layer on every operation and computes attention step by step. When nothing is hooked (no
`xa.patch`, no TransformerLens hook, no global module hook), the stream at ``embed``,
``resid_pre``, ``resid_post`` and ``final`` is what HF's own forward computes. `twin(model)`
builds that HF model once (on the meta device, then every parameter and buffer *shared* with the
bridged modules: no copy, and later changes to the weights are seen), with the bridge's attention
implementation, so the numbers are the bridge's (`tests/test_shadow.py`: equal for Llama, Mistral,
Qwen2 and Gemma 3). `LensModel.run_with_points` uses it for hook-free reads (`points_from_twin`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .points import Point

__all__ = ["FAMILIES", "KINDS", "hooked", "points_from_twin", "position_ids", "serves", "twin"]

KINDS = ("embed", "resid_pre", "resid_post", "final")
#: families whose twin is checked equal to the bridge (tests/test_shadow.py); others use the bridge
FAMILIES = ("llama", "mistral", "qwen2", "gemma3")


class _Stop(Exception):
    """Raised from the deepest point's hook: the layers above it are not run."""


def position_ids(mask: Int[Tensor, "B T"]) -> Int[Tensor, "b T"]:
    """The positions the bridge hands HF: ``arange`` unless a masked token precedes a real one
    in some row (left padding), where that row counts real tokens only."""
    T = mask.shape[1]
    arange = torch.arange(T, device=mask.device)
    derived = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    needs = ((derived != arange) & (mask != 0)).any(dim=1, keepdim=True)
    if not bool(needs.any()):
        return arange[None]
    return torch.where(needs, derived, arange.expand_as(derived))


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    while hasattr(m, "_original_component") and isinstance(m._original_component, torch.nn.Module):
        m = m._original_component
    return m


def twin(model: Any) -> torch.nn.Module:
    """The plain HF model of `model` (a `LensModel`), built once and kept on it; each call
    re-points its tensors at the bridged modules' current ones (a ``.to(device)`` replaces
    buffers, and may replace parameters)."""
    got = getattr(model, "_twin", None)
    if got is None:
        got = model._twin = _build(model)
    plain, links = got
    for dst, src, k, kind in links:
        getattr(dst, kind)[k] = getattr(src, kind)[k]
    return plain


def _build(model: Any) -> tuple[torch.nn.Module, list[tuple[Any, Any, str, str]]]:
    hf = model.hf_model
    with torch.device("meta"):
        plain = type(hf)(hf.config)
    links = []  # (twin module, bridged module, tensor name, "_parameters" or "_buffers")
    for path, mod in plain.named_modules():
        src = _unwrap(hf)
        for part in [p for p in path.split(".") if p]:
            src = _unwrap(getattr(src, part))
        for kind in ("_parameters", "_buffers"):
            links += [(mod, src, k, kind) for k, v in getattr(mod, kind).items() if v is not None]
    for dst, src, k, kind in links:
        getattr(dst, kind)[k] = getattr(src, kind)[k]
    left = [n for n, p in [*plain.named_parameters(), *plain.named_buffers()] if p.is_meta]
    if left:
        raise RuntimeError(f"the plain twin of {model.name!r} has unshared tensors {left[:5]}")
    return plain.eval(), links


def hooked(model: Any) -> bool:
    """Whether any forward hook could act on `model`'s pass (then the bridge must run): a global
    module hook, or a hook on any module of the bridge other than the bridge's own capture hooks
    (`_capture_hook_handles`: they only copy the stream into its hook points, whose hooks count)."""
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    got = getattr(model, "_bridge_modules", None)
    if got is None:  # the bridge's module tree is fixed once booted
        mods = list(model.bridge.modules())
        got = model._bridge_modules = (mods, [m for m in mods if hasattr(m, "_capture_hook_handles")])
    mods, owners = got
    busy = [m for m in mods if m._forward_hooks or m._forward_pre_hooks]
    if not busy:
        return False
    own = {h.id for m in owners for h in m._capture_hook_handles}
    return any(set(m._forward_hooks) - own or set(m._forward_pre_hooks) - own for m in busy)


def serves(model: Any, points: Iterable[Point], return_logits: bool, fwd_hooks: Sequence[Any]) -> bool:
    """Whether the plain twin gives this pass of `model` (a `LensModel`): ``model.use_twin``, a
    checked family, no logits asked, no hook anywhere, the bridge in HF-numerics mode, points the
    twin reads."""
    return (
        getattr(model, "use_twin", False)
        and getattr(model, "family", None) in FAMILIES
        and not return_logits
        and not fwd_hooks
        and model.bridge_mode == "hf"
        and all(p.kind in KINDS for p in points)
        and not hooked(model)
    )


def points_from_twin(
    model: Any, input_ids: Tensor, attention_mask: Tensor | None, points: dict[Any, Point], deepest: Point
) -> dict[Any, Tensor]:
    """The stream at `points` ({key: Point}) from the plain twin's forward, stopped after
    `deepest` (the unembedding is never run)."""
    plain = twin(model)
    inner = plain.model
    layers: Sequence[torch.nn.Module] = inner.layers
    store: dict[str, Tensor] = {}
    handles = []

    def out_of(name: str, stop: bool):
        def fn(mod: Any, args: Any, out: Any) -> None:
            store[name] = out[0] if isinstance(out, tuple) else out
            if stop:
                raise _Stop

        return fn

    def into(name: str, stop: bool):
        def fn(mod: Any, args: Any, kwargs: Any) -> None:
            store[name] = args[0] if args else kwargs["hidden_states"]
            if stop:
                raise _Stop

        return fn

    try:
        for p in {p.name: p for p in points.values()}.values():
            stop = p == deepest
            if p.kind == "embed":
                handles.append(inner.embed_tokens.register_forward_hook(out_of(p.name, stop)))
            elif p.kind == "resid_pre":
                handles.append(
                    layers[p.layer].register_forward_pre_hook(into(p.name, stop), with_kwargs=True)
                )
            elif p.kind == "resid_post":
                handles.append(layers[p.layer].register_forward_hook(out_of(p.name, stop)))
            else:
                handles.append(inner.norm.register_forward_hook(out_of(p.name, stop)))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        try:
            inner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    return {k: store[p.name] for k, p in points.items()}
