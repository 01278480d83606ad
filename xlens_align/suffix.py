"""B's decoder stack run from a residual point on, with the clean prefix computed once.

Writing values into B's stream at ``resid_pre.L`` changes nothing below layer L: every patched
variant of a batch that targets layer L shares the clean computation of layers ``0..L-1``. A
`Suffix` holds one batch of B's tokens; `Suffix.logits` / `Suffix.final_rows` take (patched)
streams at points (each k replicates of the batch) and run only what lies above each point, with
Hugging Face's own pieces, exactly as the model's ``forward`` does; streams of several points
are stacked, each joining at the first layer above its point, so every layer runs once:

* the decoder layers ``L..n-1`` (``resid_pre.L``) or ``L+1..n-1`` (``resid_post.L``), all of
  them for ``embed`` (what enters layer 0: ``resid_pre.0`` for these families); none for ``final``
  (the stream after the final norm);
* the attention masks from ``transformers.masking_utils`` (``create_causal_mask``, and
  ``create_sliding_window_causal_mask`` for Mistral's window and the sliding layers of Qwen2 and
  Gemma 3, per ``config.layer_types``) and the position ids the bridge would pass;
* the model's rotary embedding module (Gemma 3: one per layer type, local and global);
* the final norm, ``lm_head`` and Gemma's final logit soft-capping, on the requested rows only
  (the norm acts row by row), so the unembedding is paid for the scored predictions alone.

Gemma's embedding scale sits in the embedding module, so ``embed`` (its output) is what layer 0
reads, as for the other families. Supported: `LensModel`s of the families in `FAMILIES` in the
bridge's default (HF-numerics) mode, at ``embed``, ``resid_pre``, ``resid_post`` and ``final``
(`supported`); anything else (``resid_mid``, remote models) goes through
`patching.forward_patched`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .models import LensModel
from .points import Point
from .shadow import position_ids

__all__ = ["FAMILIES", "KINDS", "Suffix", "supported"]

FAMILIES = ("llama", "mistral", "qwen2", "gemma3")
KINDS = ("embed", "resid_pre", "resid_post", "final")


def supported(model: Any, point: Point) -> bool:
    """Whether `Suffix` runs `model` from `point` (else: the full patched forward)."""
    return (
        isinstance(model, LensModel)
        and model.family in FAMILIES
        and model.bridge_mode == "hf"
        and point.kind in KINDS
    )


class Suffix:
    """One batch of B's tokens (`input_ids`, `attention_mask` [B, T]); `logits` runs B from
    points on over replicates of the batch stacked along the batch dimension."""

    def __init__(
        self, model: LensModel, input_ids: Int[Tensor, "B T"], attention_mask: Int[Tensor, "B T"] | None
    ) -> None:
        hf = model.hf_model
        self.model = model
        self.inner = hf.model
        self.lm_head = hf.lm_head
        self.config = self.inner.config
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        bias = getattr(self.lm_head, "bias", None)  # the bridge gives lm_head a zero bias: skip it
        self._bias = None if bias is None or not bool(bias.any()) else bias
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.mask = attention_mask
        self.rows = int(input_ids.shape[0])
        self.position_ids = position_ids(attention_mask)
        n = model.n_layers
        types = getattr(self.config, "layer_types", None)
        if types is None:
            kind = (
                "full_attention"
                if getattr(self.config, "sliding_window", None) is None
                else "sliding_attention"
            )
            types = [kind] * n
        self.layer_types: list[str] = list(types)[:n]
        self._cache: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

    def _context(self, h: Tensor) -> tuple[dict[str, Any], dict[str, Any], Tensor]:
        """(mask per layer type, rotary (cos, sin) per layer type, position ids) for a stream of
        h's rows (K replicates of the batch); the first R rows of each serve a stream of R rows."""
        R = int(h.shape[0])
        got = self._cache.get(R)
        if got is not None:
            return got
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        k = R // self.rows
        mask = self.mask if k == 1 else self.mask.repeat(k, 1)
        pos = self.position_ids if self.position_ids.shape[0] == 1 else self.position_ids.repeat(k, 1)
        kw = dict(config=self.config, inputs_embeds=h, attention_mask=mask, cache=None, position_ids=pos)
        makers = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        per_type = self.model.family == "gemma3"  # local and global layers: their own rotary
        shared = None if per_type else self.inner.rotary_emb(h, pos)
        masks, rotary = {}, {}
        for t in dict.fromkeys(self.layer_types):
            if t not in makers:
                raise ValueError(
                    f"layer type {t!r} of model {self.model.name!r} is not handled by the suffix"
                )
            masks[t] = makers[t](**kw)
            rotary[t] = self.inner.rotary_emb(h, pos, t) if per_type else shared
        self._cache = {R: (masks, rotary, pos)}  # one stream size at a time
        return self._cache[R]

    def first_layer(self, point: Point) -> int:
        """The first decoder layer that runs above `point`."""
        if point.kind == "final":
            return self.model.n_layers
        if point.kind == "embed":
            return 0
        return point.layer + (point.kind == "resid_post")

    def hidden(self, streams: Sequence[tuple[Point, Float[Tensor, "r T d"]]]) -> Float[Tensor, "R T d"]:
        """The stream after the last decoder layer (before the final norm) of every ``(point,
        stream at point)`` in `streams` (``resid_pre`` / ``resid_post``, each r_i = k_i x B rows,
        sorted by depth), stacked in that order. Each layer runs once, over the rows of every
        stream that has reached it: a stream joins the stack at the first layer above its point."""
        starts = [self.first_layer(p) for p, _ in streams]
        if starts != sorted(starts) or any(p.kind == "final" for p, _ in streams):
            raise ValueError("streams must be embed / resid_pre / resid_post points sorted by depth")
        R = sum(int(x.shape[0]) for _, x in streams)
        if R % self.rows:
            raise ValueError(f"the streams have {R} rows, not a multiple of the batch's {self.rows}")
        joined = [x for (_, x), i in zip(streams, starts, strict=True) if i == starts[0]]
        h = torch.cat(joined) if len(joined) > 1 else joined[0]
        e = len(joined)
        masks, rotary, pos = self._context(h if e == len(streams) else h.new_empty(R, *h.shape[1:]))
        for i in range(starts[0], self.model.n_layers):
            while e < len(streams) and starts[e] == i:
                h = torch.cat([h, streams[e][1]])
                e += 1
            r, t = int(h.shape[0]), self.layer_types[i]
            out = self.inner.layers[i](
                h,
                attention_mask=_rows(masks[t], r),
                position_ids=_rows(pos, r),
                position_embeddings=tuple(_rows(x, r) for x in rotary[t]),
            )
            h = out[0] if isinstance(out, tuple) else out
        if e < len(streams):  # resid_post of the last layer: no layer above
            h = torch.cat([h, *(x for _, x in streams[e:])])
        return h

    @property
    def linear_weight(self) -> Tensor | None:
        """``lm_head``'s weight [V, d] when logit differences are exactly ``W (h - h0)`` in float32
        or float64 (no soft-capping; a bias cancels), else None (see `scoring.metrics_hidden`)."""
        w = self.lm_head.weight
        return w if self.softcap is None and w.dtype in (torch.float32, torch.float64) else None

    def unembed(self, h: Float[Tensor, "n d"], normed: bool = True) -> Float[Tensor, "n V"]:
        """Logits of rows after the final norm (`normed=False`: rows of the last layer's output)."""
        if not normed:
            h = self.inner.norm(h)
        z = torch.nn.functional.linear(h, self.lm_head.weight, self._bias)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def final_rows(
        self, streams: Sequence[tuple[Point, Float[Tensor, "r T d"]]], at: Sequence[Tensor]
    ) -> Float[Tensor, "n d"]:
        """The stream after the final norm at the cells ``at = (rows, positions)`` (rows index the
        streams stacked in order) of `streams` as in `hidden` (``final`` streams last: they are
        already after the norm). The norm runs on those rows only."""
        above = [(p, x) for p, x in streams if p.kind != "final"]
        finals = [x for p, x in streams if p.kind == "final"]
        is_final = [p.kind == "final" for p, _ in streams]
        if is_final != sorted(is_final):
            raise ValueError("final streams must come last")
        rows, pos = at
        R1 = sum(int(x.shape[0]) for _, x in above)
        out = []
        if above:
            h = self.hidden(above)
            sel = rows < R1
            out.append((sel, self.inner.norm(h[rows[sel], pos[sel]])))
        if finals:
            h = torch.cat(finals) if len(finals) > 1 else finals[0]
            sel = rows >= R1
            out.append((sel, h[rows[sel] - R1, pos[sel]]))
        if len(out) == 1:
            return out[0][1]
        res = out[0][1].new_empty(rows.shape[0], out[0][1].shape[-1])
        for sel, x in out:
            res[sel] = x
        return res

    def logits(self, streams: Sequence[tuple[Point, Tensor]], at: Sequence[Tensor]) -> Float[Tensor, "n V"]:
        """B's logits at the cells `at` of `streams` (see `final_rows`)."""
        return self.unembed(self.final_rows(streams, at))


def _rows(x: Any, r: int) -> Any:
    """The first r rows of a per-row tensor (kept whole when it broadcasts over rows or is None)."""
    return x[:r] if isinstance(x, Tensor) and x.shape[0] > 1 else x
