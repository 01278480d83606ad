"""One tokenizer's view of the texts: template prefix / suffix, text tokens and their character offsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Encoded", "check_tokenizer", "encode", "pad_id"]


@dataclass
class Encoded:
    """One text as one tokenizer sees it: template prefix, text tokens, template suffix."""

    prefix: list[int]
    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    suffix: list[int]
    bos: int  # index of BOS in prefix, -1 if none


def check_tokenizer(tok: Any, name: str) -> None:
    if not callable(tok) or not hasattr(tok, "convert_ids_to_tokens"):
        raise TypeError(
            f"{name} must be a Hugging Face fast tokenizer (PreTrainedTokenizerFast), got {type(tok).__name__}"
        )
    if not getattr(tok, "is_fast", False):
        raise TypeError(
            f"{name} is a slow tokenizer ({type(tok).__name__}) without offset mapping; alignment needs a "
            "fast tokenizer with offsets (PreTrainedTokenizerFast, e.g. AutoTokenizer.from_pretrained(..., "
            "use_fast=True) or PreTrainedTokenizerFast(tokenizer_object=...))"
        )


def pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return 0


def encode(tok: Any, texts: list[str], add_bos: bool, name: str) -> list[Encoded]:
    try:
        enc = tok(
            texts,
            add_special_tokens=add_bos,
            return_offsets_mapping=True,
            return_attention_mask=False,
            truncation=False,
            padding=False,
            verbose=False,
        )
    except NotImplementedError as e:  # slow tokenizers refuse return_offsets_mapping
        raise TypeError(
            f"{name} cannot return offsets ({e}); alignment needs a fast tokenizer with offsets"
        ) from e
    encodings = getattr(enc, "encodings", None)
    if not encodings:
        raise TypeError(f"{name} returned no offset encodings; alignment needs a fast tokenizer with offsets")
    bos_id = getattr(tok, "bos_token_id", None)
    out = []
    for i, (e, text) in enumerate(zip(encodings, texts, strict=True)):
        ids = list(e.ids)
        offs = list(e.offsets)
        seq = list(e.sequence_ids)
        content = [j for j, s in enumerate(seq) if s is not None]
        if not content:
            raise ValueError(
                f"texts[{i}]: {name} produced no tokens for the text, so no common token boundary exists"
            )
        lo, hi = content[0], content[-1] + 1
        if len(content) != hi - lo:
            raise ValueError(f"texts[{i}]: {name} interleaves template tokens with the text's tokens")
        prefix, suffix = ids[:lo], ids[hi:]
        bos = prefix.index(bos_id) if (isinstance(bos_id, int) and bos_id in prefix) else -1
        if add_bos and bos == -1 and isinstance(bos_id, int):
            prefix = [bos_id, *prefix]
            bos = 0
        o = np.asarray(offs[lo:hi], dtype=np.int64).reshape(-1, 2)
        if (o[:, 0] > o[:, 1]).any() or (o < 0).any() or (o > len(text)).any():
            raise ValueError(f"texts[{i}]: {name} returned offsets outside the text: {o.tolist()[:8]}")
        if not (o[:, 1] > o[:, 0]).any():
            raise ValueError(
                f"texts[{i}]: {name} returned only empty offsets for {hi - lo} tokens, so no common token "
                "boundary can be found; is it a fast tokenizer with a working offset mapping?"
            )
        out.append(
            Encoded(
                prefix, np.asarray(ids[lo:hi], dtype=np.int64), o[:, 0].copy(), o[:, 1].copy(), suffix, bos
            )
        )
    return out
