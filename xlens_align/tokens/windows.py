"""Rows of a batch: one per text, or several when a text is over `max_length` (``overflow``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .cuts import TextChunks
from .encoding import Encoded

__all__ = ["OVERFLOWS", "Overflow", "Row", "check_max_length", "rows_for_text"]

Overflow = Literal["error", "truncate", "windows"]
OVERFLOWS: tuple[str, ...] = ("error", "truncate", "windows")


@dataclass
class Row:
    text: int
    c0: int
    c1: int
    truncated: bool
    window: int


def _row_len(e: Encoded, k: np.ndarray, c0: int, c1: int, n_chunks: int) -> int:
    return len(e.prefix) + int(k[c1] - k[c0]) + (len(e.suffix) if c1 == n_chunks else 0)


def check_max_length(max_length: Any) -> tuple[int, int] | None:
    if max_length is None:
        return None
    if isinstance(max_length, bool):
        raise TypeError(f"max_length must be an int, a pair of ints (A, B) or None, got {max_length!r}")
    if isinstance(max_length, int):
        pair = (max_length, max_length)
    elif (
        isinstance(max_length, Sequence)
        and len(max_length) == 2
        and all(isinstance(m, int) and not isinstance(m, bool) for m in max_length)
    ):
        pair = (int(max_length[0]), int(max_length[1]))
    else:
        raise TypeError(f"max_length must be an int, a pair of ints (A, B) or None, got {max_length!r}")
    if min(pair) < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length!r}")
    return pair


def rows_for_text(
    i: int, ea: Encoded, eb: Encoded, ch: TextChunks, limit: tuple[int, int] | None, overflow: str
) -> list[Row]:
    n = len(ch.pos) - 1

    def fits(c0: int, c1: int) -> bool:
        return _row_len(ea, ch.ka, c0, c1, n) <= limit[0] and _row_len(eb, ch.kb, c0, c1, n) <= limit[1]

    if limit is None or fits(0, n):
        return [Row(i, 0, n, False, 0)]
    la, lb = _row_len(ea, ch.ka, 0, n, n), _row_len(eb, ch.kb, 0, n, n)
    if overflow == "error":
        raise ValueError(
            f"texts[{i}] is too long: {la} tokens for A and {lb} for B (special tokens included), over "
            f"max_length {limit[0]} / {limit[1]}; pass overflow='truncate' or overflow='windows', or shorten it"
        )

    def no_boundary(c0: int) -> ValueError:
        return ValueError(
            f"texts[{i}]: no common token boundary within max_length {limit[0]} / {limit[1]} after character "
            f"{int(ch.pos[c0])}: the next aligned chunk alone needs {_row_len(ea, ch.ka, c0, c0 + 1, n)} tokens "
            f"for A and {_row_len(eb, ch.kb, c0, c0 + 1, n)} for B (special tokens included)"
        )

    if overflow == "truncate":
        c1 = 0
        while c1 < n and fits(0, c1 + 1):
            c1 += 1
        if c1 == 0:
            raise no_boundary(0)
        return [Row(i, 0, c1, True, 0)]
    rows = []
    c0 = 0
    while c0 < n:
        c1 = c0
        while c1 < n and fits(c0, c1 + 1):
            c1 += 1
        if c1 == c0:
            raise no_boundary(c0)
        rows.append(Row(i, c0, c1, False, len(rows)))
        c0 = c1
    return rows
