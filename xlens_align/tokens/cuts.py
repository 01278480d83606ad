"""Token boundaries: where each tokenization may be cut, where both may, and the chunks that gives.

All positions are Python string indices (Unicode code points), as fast tokenizers report them;
`byte_positions` converts them to UTF-8 byte offsets for the chunk table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .encoding import Encoded

__all__ = ["TextChunks", "byte_positions", "common_chunks", "common_cuts", "boundaries"]


def boundaries(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interior boundaries of one tokenization.

    Returns ``(k, lo, hi)``: cutting before token k (k in 1..n-1) is a boundary, and any character
    position in [lo, hi] is consistent with it (lo == hi unless characters between the tokens are
    covered by no token). Empty-offset tokens go with the following token.
    """
    nonempty = np.flatnonzero(ends > starts)
    if nonempty.size < 2:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    s, e = starts[nonempty], ends[nonempty]
    prefix_max_end = np.maximum.accumulate(e)[:-1]
    suffix_min_start = np.minimum.accumulate(s[::-1])[::-1][1:]
    valid = prefix_max_end <= suffix_min_start
    return nonempty[:-1][valid] + 1, prefix_max_end[valid], suffix_min_start[valid]


def common_cuts(
    a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray], n_chars: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boundaries shared by both tokenizations: ``(k_a, k_b, char_pos)``, strictly increasing,
    interior (0 < char_pos < n_chars)."""
    ka, lo_a, hi_a = a
    kb, lo_b, hi_b = b
    if np.array_equal(lo_a, hi_a) and np.array_equal(lo_b, hi_b):
        pos, ia, ib = np.intersect1d(lo_a, lo_b, return_indices=True)
        keep = (pos > 0) & (pos < n_chars)
        return ka[ia[keep]], kb[ib[keep]], pos[keep]
    out_a, out_b, out_p = [], [], []
    i = j = 0
    last = 0
    while i < len(ka) and j < len(kb):
        if hi_a[i] < lo_b[j]:
            i += 1
        elif hi_b[j] < lo_a[i]:
            j += 1
        else:
            p = max(int(lo_a[i]), int(lo_b[j]))
            if last < p < n_chars:
                out_a.append(int(ka[i]))
                out_b.append(int(kb[j]))
                out_p.append(p)
                last = p
            i += 1
            j += 1
    return (
        np.asarray(out_a, dtype=np.int64),
        np.asarray(out_b, dtype=np.int64),
        np.asarray(out_p, dtype=np.int64),
    )


def byte_positions(text: str) -> np.ndarray:
    """byte_pos[c] = UTF-8 length of text[:c], for c in 0..len(text)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)]).astype(np.int64)


@dataclass
class TextChunks:
    pos: np.ndarray  # [C + 1] character boundaries
    ka: np.ndarray  # [C + 1] token boundaries in A's text tokens
    kb: np.ndarray


def common_chunks(ea: Encoded, eb: Encoded, n_chars: int) -> TextChunks:
    ka, kb, pos = common_cuts(boundaries(ea.starts, ea.ends), boundaries(eb.starts, eb.ends), n_chars)
    return TextChunks(
        pos=np.concatenate([[0], pos, [n_chars]]).astype(np.int64),
        ka=np.concatenate([[0], ka, [len(ea.ids)]]).astype(np.int64),
        kb=np.concatenate([[0], kb, [len(eb.ids)]]).astype(np.int64),
    )
