"""Text B generates under a mapped patch, beside its clean and ablated continuations (`generate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..patching import forward_patched
from ..rows import RowFilter
from ..validate import nonneg_int
from .ablation import ablation_vectors
from .mapped import check_map, mapped_patch

__all__ = ["generate"]


def generate(
    pair: Any,
    map: Any,
    prompt: str,
    *,
    source: str,
    target: str,
    max_new_tokens: int = 30,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    ablation: str | Tensor = "mean",
    ablation_texts: Sequence[str] | None = None,
    drop_first: int = 0,
) -> dict[str, Any]:
    """B's continuation of `prompt` clean, under the mapped patch, and under the ablation.

    The patch (and the ablation) are written at the prompt's aligned positions only; generated
    tokens are not patched. Each step re-runs B's full forward on [clean, patched, ablated] rows
    (no KV cache: quadratic in length, fine for short generations). Greedy by default; with
    ``do_sample=True`` each row samples from ``softmax(logits / temperature)`` with its own
    generator seeded with `seed`, so rows with equal distributions draw the same tokens.
    Generation of a row stops at B's EOS token (not included in the text).

    Returns {"prompt", "clean", "patched", "ablated" (decoded continuations), "tokens" (their
    token ids), "source", "target", "ablation", "n_patched"}.
    """
    if not isinstance(prompt, str) or not prompt:
        raise TypeError(f"prompt must be a non-empty str, got {prompt!r}")
    max_new_tokens = nonneg_int(max_new_tokens, "max_new_tokens")
    if do_sample and not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    src, tgt = check_map(pair, map, source, target)
    b = pair.b
    mp = mapped_patch(pair, map, [prompt], source=src, target=tgt, drop_first=drop_first)
    prompt_len = int(mp.attention_mask[0].sum())
    if prompt_len + max_new_tokens > b.n_ctx:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} after a prompt of {prompt_len} tokens runs past model B's "
            f"context of {b.n_ctx} tokens; lower max_new_tokens or shorten the prompt"
        )
    n = int(mp.values.shape[0])
    if n == 0:
        raise ValueError(f"the prompt has no aligned position to patch (drop_first={drop_first})")
    abl_vecs, abl_name = ablation_vectors(
        pair, [tgt], ablation, ablation_texts, [prompt], batch_size=8, rows=RowFilter(drop_first=drop_first),
        align={}, stacklevel=3,
    )  # fmt: skip
    _, pos = mp.positions
    values = torch.cat([mp.values, abl_vecs[tgt].expand(n, -1)])
    rows = torch.cat([torch.full_like(pos, 1), torch.full_like(pos, 2)])
    spec = {tgt: (values, (rows, torch.cat([pos, pos])))}
    ids = mp.input_ids[:1, :prompt_len].repeat(3, 1)
    eos = b.tokenizer.eos_token_id
    gens = [torch.Generator().manual_seed(int(seed)) for _ in range(3)]
    done = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = forward_patched(b, ids, None, spec)[:, -1].float().cpu()
            if do_sample:
                probs = torch.softmax(logits / float(temperature), dim=-1)
                nxt = torch.cat([torch.multinomial(probs[r], 1, generator=gens[r]) for r in range(3)])
            else:
                nxt = logits.argmax(-1)
            ids = torch.cat([ids, nxt[:, None].to(ids.device)], dim=1)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
    out_tokens: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    for r, name in enumerate(("clean", "patched", "ablated")):
        new = ids[r, prompt_len:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
        out_tokens[name] = new
        texts[name] = b.tokenizer.decode(new, skip_special_tokens=True)
    return {
        "prompt": prompt,
        **texts,
        "tokens": out_tokens,
        "source": src,
        "target": tgt,
        "ablation": abl_name,
        "n_patched": n,
    }
