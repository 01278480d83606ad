"""Inspection and verification of an alignment: each chunk's text by offsets and by decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .batch import AlignedBatch

__all__ = ["chunk_texts", "decoded_chunk_texts", "verify"]


def chunk_texts(batch: AlignedBatch, i: int) -> tuple[list[str], list[str]]:
    """The text of each chunk of batch row `i` as each side's tokens cover it.

    For each chunk, side A's text is the source text from the first character to the last
    character that A's tokens in the chunk carry in their offsets (likewise B). For a correct
    alignment both lists equal the chunks' character spans of the text.
    """
    text = batch.texts[int(batch.row_text[i])]
    out: tuple[list[str], list[str]] = ([], [])
    for ch in batch.chunk_table(i):
        for side, lst, (s, e) in (
            ("a", out[0], (ch.a_start, ch.a_end)),
            ("b", out[1], (ch.b_start, ch.b_end)),
        ):
            off = getattr(batch, f"offsets_{side}")[i, s:e]
            real = off[(off[:, 1] > off[:, 0])]
            lst.append(text[int(real[:, 0].min()) : int(real[:, 1].max())] if len(real) else "")
    return out


def _decode(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decoded_chunk_texts(batch: AlignedBatch, i: int, tok_a: Any, tok_b: Any) -> tuple[list[str], list[str]]:
    """The text of each chunk of batch row `i`, decoded from each side's token ids.

    Chunk c's text is decode(row tokens up to the chunk's end) minus decode(row tokens up to its
    start), counting from the row's first text token. This is exact for decoders that strip the
    SentencePiece prefix space once at the start, and for byte-level decoders, as long as the
    row starts at the beginning of its text (a window row that starts on a space loses that
    space under a SentencePiece decoder). A SentencePiece tokenizer also decodes a literal "▁"
    (U+2581) in the text as a space: its encoding is lossy there, the alignment is not.
    """
    out: tuple[list[str], list[str]] = ([], [])
    table = batch.chunk_table(i)
    if not table:
        return out
    for side, tok, lst in (("a", tok_a, out[0]), ("b", tok_b, out[1])):
        ids = getattr(batch, f"input_ids_{side}")[i].tolist()
        first = getattr(table[0], f"{side}_start")
        prev = ""
        for ch in table:
            s, e = getattr(ch, f"{side}_start"), getattr(ch, f"{side}_end")
            full = _decode(tok, ids[first:e])
            lst.append(full[len(prev) :] if full.startswith(prev) else _decode(tok, ids[s:e]))
            prev = full
    return out


def verify(batch: AlignedBatch, tok_a: Any, tok_b: Any, rows: Sequence[int] | None = None) -> list[str]:
    """Check rows (all by default): chunks tile the row's text and every chunk's text is the same
    from A's offsets, B's offsets, A's decoded tokens and B's decoded tokens (on a window row that
    starts inside its text, the first chunk is checked by offsets only). Returns a list of
    problems, empty when the alignment is right. Decoding is quadratic in the row length."""
    problems = []
    for i in range(len(batch)) if rows is None else rows:
        table = batch.chunk_table(i)
        text = batch.texts[int(batch.row_text[i])]
        pos = int(batch.row_char_start[i])
        for c, ch in enumerate(table):
            if ch.char_start != pos or ch.char_end <= ch.char_start:
                problems.append(
                    f"row {i} chunk {c}: span [{ch.char_start}, {ch.char_end}) does not continue at {pos}"
                )
            pos = ch.char_end
        if pos != int(batch.row_char_end[i]):
            problems.append(f"row {i}: chunks end at {pos}, row ends at {int(batch.row_char_end[i])}")
        off_a, off_b = chunk_texts(batch, i)
        dec_a, dec_b = decoded_chunk_texts(batch, i, tok_a, tok_b)
        for c, ch in enumerate(table):
            want = text[ch.char_start : ch.char_end]
            got = {"offsets A": off_a[c], "offsets B": off_b[c]}
            if c > 0 or int(batch.row_char_start[i]) == 0:  # see decoded_chunk_texts on window rows
                got.update({"decoded A": dec_a[c], "decoded B": dec_b[c]})
            bad = {k: v for k, v in got.items() if v != want}
            if bad:
                problems.append(
                    f"row {i} chunk {c} {want!r}: " + ", ".join(f"{k} {v!r}" for k, v in bad.items())
                )
    return problems
