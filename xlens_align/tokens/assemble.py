"""`align`: tokenize texts with both tokenizers, cut them at common boundaries, build the batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..validate import check_texts
from .batch import POLICIES, AlignedBatch, Policy
from .cuts import TextChunks, byte_positions, common_chunks
from .encoding import Encoded, check_tokenizer, encode, pad_id
from .windows import OVERFLOWS, Overflow, Row, check_max_length, rows_for_text

__all__ = ["align"]


def align(
    tok_a: Any,
    tok_b: Any,
    texts: Sequence[str],
    *,
    policy: Policy = "last",
    max_length: int | tuple[int, int] | None = None,
    overflow: Overflow = "error",
    add_bos: bool = True,
) -> AlignedBatch:
    """Tokenize `texts` with both tokenizers and align their positions chunk by chunk.

    Args:
        tok_a, tok_b: Hugging Face fast tokenizers (offsets are needed; a slow one is a TypeError).
        texts: non-empty strings.
        policy: default pooling of `AlignedBatch.gather`: "last" (last token of each chunk),
            "mean" (mean over each chunk's tokens) or "final" (last token of each row's text).
        max_length: token limit per row, special tokens included: an int for both sides or a
            pair (A, B). None: no limit.
        overflow: what to do with a text over `max_length` on either side: "error" (ValueError
            naming it), "truncate" (cut both sides at the last common boundary that fits both
            limits; `truncated` marks the row) or "windows" (split at common boundaries into
            several rows that each fit, each with its own BOS; `row_text`/`window` record them).
        add_bos: prepend the tokenizers' BOS (added by the tokenizer's template, or prepended
            here when the tokenizer has a BOS token but its template did not add it).
    """
    check_tokenizer(tok_a, "tok_a")
    check_tokenizer(tok_b, "tok_b")
    texts = check_texts(texts)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    limit = check_max_length(max_length)

    enc_a = encode(tok_a, texts, add_bos, "tok_a")
    enc_b = encode(tok_b, texts, add_bos, "tok_b")
    chunks = [common_chunks(ea, eb, len(t)) for ea, eb, t in zip(enc_a, enc_b, texts, strict=True)]
    rows: list[Row] = []
    for i, (ea, eb, ch) in enumerate(zip(enc_a, enc_b, chunks, strict=True)):
        rows.extend(rows_for_text(i, ea, eb, ch, limit, overflow))
    byte_pos = [byte_positions(t) for t in texts]

    pad_a, pad_b = pad_id(tok_a), pad_id(tok_b)
    side_a = _build_side(rows, enc_a, [c.ka for c in chunks], chunks, pad_a)
    side_b = _build_side(rows, enc_b, [c.kb for c in chunks], chunks, pad_b)

    # flat chunk table
    chunk_row, chunk_index, char_s, char_e, byte_s, byte_e = [], [], [], [], [], []
    ptr = [0]
    for r, row in enumerate(rows):
        ch = chunks[row.text]
        m = row.c1 - row.c0
        chunk_row.append(np.full(m, r, dtype=np.int64))
        chunk_index.append(np.arange(m, dtype=np.int64))
        char_s.append(ch.pos[row.c0 : row.c1])
        char_e.append(ch.pos[row.c0 + 1 : row.c1 + 1])
        byte_s.append(byte_pos[row.text][ch.pos[row.c0 : row.c1]])
        byte_e.append(byte_pos[row.text][ch.pos[row.c0 + 1 : row.c1 + 1]])
        ptr.append(ptr[-1] + m)

    def cat(parts: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def ten(x: Sequence[int]) -> Tensor:
        return torch.tensor(list(x), dtype=torch.long)

    return AlignedBatch(
        texts=texts,
        input_ids_a=side_a["ids"],
        input_ids_b=side_b["ids"],
        attention_mask_a=side_a["mask"],
        attention_mask_b=side_b["mask"],
        position_ids_a=side_a["pos"],
        position_ids_b=side_b["pos"],
        lengths_a=side_a["len"],
        lengths_b=side_b["len"],
        offsets_a=side_a["off"],
        offsets_b=side_b["off"],
        bos_index_a=side_a["bos"],
        bos_index_b=side_b["bos"],
        pad_id_a=pad_a,
        pad_id_b=pad_b,
        row_text=ten(r.text for r in rows),
        row_char_start=ten(int(chunks[r.text].pos[r.c0]) for r in rows),
        row_char_end=ten(int(chunks[r.text].pos[r.c1]) for r in rows),
        truncated=torch.tensor([r.truncated for r in rows], dtype=torch.bool),
        window=ten(r.window for r in rows),
        chunk_row=cat(chunk_row),
        chunk_index=cat(chunk_index),
        chunk_char_start=cat(char_s),
        chunk_char_end=cat(char_e),
        chunk_byte_start=cat(byte_s),
        chunk_byte_end=cat(byte_e),
        chunk_a_start=side_a["cs"],
        chunk_a_end=side_a["ce"],
        chunk_b_start=side_b["cs"],
        chunk_b_end=side_b["ce"],
        chunk_ptr=ten(ptr),
        segment_ids_a=side_a["seg"],
        segment_ids_b=side_b["seg"],
        policy=policy,
        max_length=limit,
        overflow=overflow,
    )


def _build_side(
    rows: list[Row], enc: list[Encoded], ks: list[np.ndarray], chunks: list[TextChunks], pad: int
) -> dict[str, Tensor]:
    """Padded tensors of one side plus its chunk token ranges and segment ids."""
    ids_rows, off_rows, bos, cs, ce = [], [], [], [], []
    for row in rows:
        e, k = enc[row.text], ks[row.text]
        n = len(chunks[row.text].pos) - 1
        t0, t1 = int(k[row.c0]), int(k[row.c1])
        suffix = e.suffix if row.c1 == n else []
        p = len(e.prefix)
        ids_rows.append(
            np.concatenate(
                [np.asarray(e.prefix, dtype=np.int64), e.ids[t0:t1], np.asarray(suffix, dtype=np.int64)]
            )
        )
        off = np.full((len(ids_rows[-1]), 2), -1, dtype=np.int64)
        off[p : p + t1 - t0, 0] = e.starts[t0:t1]
        off[p : p + t1 - t0, 1] = e.ends[t0:t1]
        off_rows.append(off)
        bos.append(e.bos)
        cs.append(k[row.c0 : row.c1] - t0 + p)
        ce.append(k[row.c0 + 1 : row.c1 + 1] - t0 + p)
    lengths = np.asarray([len(x) for x in ids_rows], dtype=np.int64)
    B, T = len(rows), int(lengths.max())
    ids = np.full((B, T), pad, dtype=np.int64)
    offsets = np.full((B, T, 2), -1, dtype=np.int64)
    for r, (x, o) in enumerate(zip(ids_rows, off_rows, strict=True)):
        ids[r, : len(x)] = x
        offsets[r, : len(x)] = o
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    starts, ends = np.concatenate(cs).astype(np.int64), np.concatenate(ce).astype(np.int64)
    counts = ends - starts
    chunk_rows = np.repeat(np.arange(B), [len(c) for c in cs])
    # token positions of every chunk's tokens, without a Python loop over tokens
    seg_chunk = np.repeat(np.arange(len(starts)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    seg = np.full((B, T), -1, dtype=np.int64)
    seg[chunk_rows[seg_chunk], starts[seg_chunk] + within] = seg_chunk
    return {
        "ids": torch.from_numpy(ids),
        "mask": torch.from_numpy(mask),
        "pos": torch.arange(T, dtype=torch.long).unsqueeze(0).expand(B, T).contiguous(),
        "len": torch.from_numpy(lengths),
        "off": torch.from_numpy(offsets),
        "bos": torch.tensor(bos, dtype=torch.long),
        "cs": torch.from_numpy(starts),
        "ce": torch.from_numpy(ends),
        "seg": torch.from_numpy(seg),
    }
