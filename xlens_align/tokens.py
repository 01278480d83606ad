"""Cross-tokenizer position alignment.

Two models with different tokenizers cut the same text into different tokens, so "position t"
means different text in A and in B. `align` tokenizes every text with both tokenizers (fast
tokenizers, character offsets) and cuts the text into *aligned chunks*: the finest spans of
text whose start and end are token boundaries in both tokenizations. A chunk is a run of
tokens [a_start, a_end) in A and [b_start, b_end) in B that spell exactly the same characters,
so the activation of A at the chunk's last token and the activation of B at the chunk's last
token have read the same text. Such pairs are the rows of every map and similarity measure.

How boundaries are found (all in one coordinate system: Python string indices, i.e. Unicode
code points, which is what Hugging Face fast tokenizers report; UTF-8 byte spans are derived
from them for the chunk table):

* Tokens added by the tokenizer's template (BOS ``<s>`` / ``<|begin_of_text|>``) belong to no
  chunk; their row index is recorded (`bos_index_a`/`_b`). Special tokens *written in the
  text* are ordinary text here: they carry offsets and end up in chunks.
* A cut between token k-1 and token k is a boundary of the tokenization when every token
  before it ends at or before every token after it starts. Overlapping offsets therefore
  never give a boundary: byte-fallback pieces (``<0xF0><0x9F>...``) or byte-level pieces of
  one multi-byte character all carry that character's span, and SentencePiece's prefix
  ``▁`` (offsets ``(0, 1)``, overlapping the next token ``▁word`` at ``(0, 5)``) stays with
  the next token. A boundary inside one character exists in neither text.
* Tokens with empty offsets (``start == end``) are attached to the chunk that follows them
  (to the last chunk at the end of the text). Characters that no token covers (a
  tokenizer that trims offsets) are attached to the token that follows them.
* The chunks are cut at the common boundaries. They tile the text (no gap, no overlap) and
  every chunk has at least one token on each side.

Identical tokenizers give identical token ids in every chunk, one token per chunk wherever
a token ends on a character boundary; tokens that share characters (several byte pieces of
one character, a SentencePiece prefix ``▁`` before a token that also starts with the space)
stay grouped, k tokens against the same k tokens.

Pooling (`policy`): ``"last"`` takes each chunk's last token on each side (what a causal
model has read up to the end of the chunk), ``"mean"`` averages each chunk's tokens, and
``"final"`` takes the last token of each row's text. BOS and padding are never gathered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "OVERFLOWS",
    "POLICIES",
    "AlignedBatch",
    "Chunk",
    "RowMeta",
    "align",
    "chunk_texts",
    "decoded_chunk_texts",
    "verify",
]

Policy = Literal["last", "mean", "final"]
Overflow = Literal["error", "truncate", "windows"]
POLICIES: tuple[str, ...] = ("last", "mean", "final")
OVERFLOWS: tuple[str, ...] = ("error", "truncate", "windows")


class Chunk(NamedTuple):
    """One aligned chunk of one row: text span and token ranges (row indices, BOS counted)."""

    char_start: int
    char_end: int
    byte_start: int
    byte_end: int
    a_start: int
    a_end: int
    b_start: int
    b_end: int

    @property
    def n_a(self) -> int:
        return self.a_end - self.a_start

    @property
    def n_b(self) -> int:
        return self.b_end - self.b_start

    @property
    def one_to_one(self) -> bool:
        return self.n_a == 1 and self.n_b == 1


@dataclass
class RowMeta:
    """What each gathered row is: one entry per row of `gather`'s X and Y.

    `pos_a`/`pos_b` are the gathered token positions (for ``"mean"`` the chunk's last token),
    counted from the start of the batch row, BOS included (the first text token is at 1 when
    there is a BOS). `start_a`/`start_b` are the chunk's first token positions, `chunk` the
    chunk's index within its batch row (0 = first chunk of the row), `text` the index of the
    source text in `AlignedBatch.texts`, `row` the batch row.
    """

    text: Int[Tensor, " n"]
    row: Int[Tensor, " n"]
    chunk: Int[Tensor, " n"]
    pos_a: Int[Tensor, " n"]
    pos_b: Int[Tensor, " n"]
    start_a: Int[Tensor, " n"]
    start_b: Int[Tensor, " n"]
    n_a: Int[Tensor, " n"]
    n_b: Int[Tensor, " n"]
    one_to_one: Bool[Tensor, " n"]
    char_start: Int[Tensor, " n"]
    char_end: Int[Tensor, " n"]

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def mask(
        self, *, min_position: int = 0, min_chunk: int = 0, one_to_one_only: bool = False
    ) -> Bool[Tensor, " n"]:
        """Rows to keep: chunk starts at token position >= `min_position` on both sides (BOS is
        position 0), chunk index >= `min_chunk`, and optionally only 1:1 chunks."""
        keep = (self.start_a >= min_position) & (self.start_b >= min_position) & (self.chunk >= min_chunk)
        if one_to_one_only:
            keep &= self.one_to_one
        return keep

    def select(self, keep: Tensor) -> RowMeta:
        """The metadata of the rows selected by a boolean mask or an index tensor."""
        return RowMeta(**{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})


_CHUNK_FIELDS = (
    "row",
    "index",
    "char_start",
    "char_end",
    "byte_start",
    "byte_end",
    "a_start",
    "a_end",
    "b_start",
    "b_end",
)


@dataclass(repr=False)
class AlignedBatch:
    """Both tokenizations of a batch of texts and their aligned chunks.

    Rows are right-padded. A row is one text, or one window of a text when ``overflow="windows"``
    split it (`row_text` gives the source text of each row). Token indices everywhere are
    indices into a padded row (BOS included).

    Fields:
        texts: the source texts (one per text, not per row).
        input_ids_a/_b: [B, T_a] / [B, T_b] token ids, right-padded with `pad_id_a`/`pad_id_b`.
        attention_mask_a/_b: 1 on real tokens (BOS included), 0 on padding.
        position_ids_a/_b: 0, 1, 2, ... per row (right padding, so the same on every row).
        lengths_a/_b: [B] number of real tokens per row.
        offsets_a/_b: [B, T, 2] character offsets of each token in its source text;
            (-1, -1) on template tokens (BOS) and padding.
        bos_index_a/_b: [B] row index of the BOS token, -1 when the row has none.
        pad_id_a/_b: the pad ids used (the tokenizer's pad token, else its EOS, else 0); padding
            is masked and never gathered.
        row_text: [B] source text index of each row; row_char_start/_end: [B] the span of its
            text that the row covers; truncated: [B] the row lost the end of its text
            (overflow="truncate"); window: [B] window number within its text (0 when not split).
        chunk_*: flat chunk table over the batch, one entry per chunk, rows in order:
            chunk_row, chunk_index (index within its row), chunk_char_start/_end (in the source
            text, characters), chunk_byte_start/_end (UTF-8 bytes), chunk_a_start/_end,
            chunk_b_start/_end (token ranges [start, end) in the row).
        chunk_ptr: [B + 1]; the chunks of row r are chunk_ptr[r]:chunk_ptr[r + 1].
        segment_ids_a/_b: [B, T] the flat chunk id each token belongs to, -1 for BOS/padding
            (for mean pooling).
        policy: the default pooling policy of `gather`.
    """

    texts: list[str]
    input_ids_a: Int[Tensor, "B Ta"]
    input_ids_b: Int[Tensor, "B Tb"]
    attention_mask_a: Int[Tensor, "B Ta"]
    attention_mask_b: Int[Tensor, "B Tb"]
    position_ids_a: Int[Tensor, "B Ta"]
    position_ids_b: Int[Tensor, "B Tb"]
    lengths_a: Int[Tensor, " B"]
    lengths_b: Int[Tensor, " B"]
    offsets_a: Int[Tensor, "B Ta 2"]
    offsets_b: Int[Tensor, "B Tb 2"]
    bos_index_a: Int[Tensor, " B"]
    bos_index_b: Int[Tensor, " B"]
    pad_id_a: int
    pad_id_b: int
    row_text: Int[Tensor, " B"]
    row_char_start: Int[Tensor, " B"]
    row_char_end: Int[Tensor, " B"]
    truncated: Bool[Tensor, " B"]
    window: Int[Tensor, " B"]
    chunk_row: Int[Tensor, " n"]
    chunk_index: Int[Tensor, " n"]
    chunk_char_start: Int[Tensor, " n"]
    chunk_char_end: Int[Tensor, " n"]
    chunk_byte_start: Int[Tensor, " n"]
    chunk_byte_end: Int[Tensor, " n"]
    chunk_a_start: Int[Tensor, " n"]
    chunk_a_end: Int[Tensor, " n"]
    chunk_b_start: Int[Tensor, " n"]
    chunk_b_end: Int[Tensor, " n"]
    chunk_ptr: Int[Tensor, " B1"]
    segment_ids_a: Int[Tensor, "B Ta"]
    segment_ids_b: Int[Tensor, "B Tb"]
    policy: str = "last"
    max_length: tuple[int, int] | None = None
    overflow: str = "error"

    # ---- sizes -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.input_ids_a.shape[0])

    @property
    def n_rows(self) -> int:
        return len(self)

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_row.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_ids_a.device

    def __repr__(self) -> str:
        return (
            f"AlignedBatch(texts={len(self.texts)}, rows={self.n_rows}, chunks={self.n_chunks}, "
            f"T_a={self.input_ids_a.shape[1]}, T_b={self.input_ids_b.shape[1]}, policy={self.policy!r}, "
            f"truncated={int(self.truncated.sum())}, windows={int((self.window > 0).sum())})"
        )

    def to(self, device: torch.device | str) -> AlignedBatch:
        """A copy with every tensor on `device`."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in dataclasses.fields(self)
        }
        return AlignedBatch(**moved)

    def model_inputs(self, side: str) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` of one side ("a" or "b")."""
        s = _side(side)
        return {
            "input_ids": getattr(self, f"input_ids_{s}"),
            "attention_mask": getattr(self, f"attention_mask_{s}"),
            "position_ids": getattr(self, f"position_ids_{s}"),
        }

    # ---- chunk table ---------------------------------------------------------------------
    @property
    def chunk_n_a(self) -> Int[Tensor, " n"]:
        return self.chunk_a_end - self.chunk_a_start

    @property
    def chunk_n_b(self) -> Int[Tensor, " n"]:
        return self.chunk_b_end - self.chunk_b_start

    @property
    def chunk_one_to_one(self) -> Bool[Tensor, " n"]:
        return (self.chunk_n_a == 1) & (self.chunk_n_b == 1)

    def chunk_table(self, i: int) -> list[Chunk]:
        """The chunks of batch row `i`, in order."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for a batch of {len(self)} rows")
        i %= len(self)
        lo, hi = int(self.chunk_ptr[i]), int(self.chunk_ptr[i + 1])
        cols = [getattr(self, f"chunk_{name}")[lo:hi].tolist() for name in _CHUNK_FIELDS[2:]]
        return [Chunk(*vals) for vals in zip(*cols, strict=True)]

    def row_text_of(self, i: int) -> str:
        """The part of its source text that batch row `i` covers."""
        return self.texts[int(self.row_text[i])][int(self.row_char_start[i]) : int(self.row_char_end[i])]

    # ---- gathering ----------------------------------------------------------------------
    def _policy(self, policy: str | None) -> str:
        policy = self.policy if policy is None else policy
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        return policy

    def _last_chunk(self) -> Int[Tensor, " B"]:
        return self.chunk_ptr[1:] - 1

    def index(
        self, policy: str | None = None
    ) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
        """Flat gather indices ``(batch_idx, pos_a, pos_b)``: ``acts_a[batch_idx, pos_a]`` pairs
        with ``acts_b[batch_idx, pos_b]``. For ``"last"`` and ``"mean"`` one entry per chunk (its
        last token), for ``"final"`` one per row (the last token of its text)."""
        policy = self._policy(policy)
        if policy == "final":
            last = self._last_chunk()
            rows = torch.arange(len(self), device=self.device)
            return rows, self.chunk_a_end[last] - 1, self.chunk_b_end[last] - 1
        return self.chunk_row, self.chunk_a_end - 1, self.chunk_b_end - 1

    def meta(self, policy: str | None = None) -> RowMeta:
        """Metadata of each row that `gather(..., policy)` returns."""
        policy = self._policy(policy)
        sel = self._last_chunk() if policy == "final" else slice(None)
        row = self.chunk_row[sel]
        n_a, n_b = self.chunk_n_a[sel], self.chunk_n_b[sel]
        return RowMeta(
            text=self.row_text[row],
            row=row,
            chunk=self.chunk_index[sel],
            pos_a=self.chunk_a_end[sel] - 1,
            pos_b=self.chunk_b_end[sel] - 1,
            start_a=self.chunk_a_start[sel],
            start_b=self.chunk_b_start[sel],
            n_a=n_a,
            n_b=n_b,
            one_to_one=(n_a == 1) & (n_b == 1),
            char_start=self.chunk_char_start[sel],
            char_end=self.chunk_char_end[sel],
        )

    def averaging_matrix(self, side: str) -> Tensor:
        """Sparse [n_chunks, B * T] matrix M with ``M @ acts.reshape(B * T, d)`` the chunk means."""
        s = _side(side)
        seg = getattr(self, f"segment_ids_{s}").reshape(-1)
        cols = torch.nonzero(seg >= 0).flatten()
        rows = seg[cols]
        counts = getattr(self, f"chunk_n_{s}").to(torch.float32)
        vals = 1.0 / counts[rows]
        # chunk ids and flat positions both increase along `cols`: the indices are already coalesced
        return torch.sparse_coo_tensor(
            torch.stack([rows, cols]),
            vals,
            (self.n_chunks, seg.numel()),
            device=seg.device,
            check_invariants=False,
            is_coalesced=True,
        )

    def gather_side(
        self, acts: Float[Tensor, "B T d"], side: str, policy: str | None = None
    ) -> Float[Tensor, "n d"]:
        """Pool one side's activations [B, T, d] into one row per chunk (or per row for "final")."""
        s = _side(side)
        policy = self._policy(policy)
        ids = getattr(self, f"input_ids_{s}")
        name = f"acts_{s}"
        if not isinstance(acts, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, T, d], got {type(acts).__name__}")
        if acts.ndim != 3 or tuple(acts.shape[:2]) != tuple(ids.shape):
            raise ValueError(
                f"{name} must have shape [B, T, d] = [{ids.shape[0]}, {ids.shape[1]}, d] to match "
                f"input_ids_{s}, got {tuple(acts.shape)}"
            )
        dev = acts.device
        if policy == "mean":
            seg = getattr(self, f"segment_ids_{s}").to(dev).reshape(-1)
            flat_pos = torch.nonzero(seg >= 0).flatten()
            acc = acts.dtype if acts.dtype in (torch.float32, torch.float64) else torch.float32
            flat = acts.reshape(-1, acts.shape[-1]).index_select(0, flat_pos).to(acc)
            sums = torch.zeros(self.n_chunks, acts.shape[-1], dtype=acc, device=dev)
            sums.index_add_(0, seg[flat_pos], flat)
            counts = getattr(self, f"chunk_n_{s}").to(dev, acc).unsqueeze(1)
            return (sums / counts).to(acts.dtype)
        rows, pos_a, pos_b = self.index(policy)
        pos = pos_a if s == "a" else pos_b
        return acts[rows.to(dev), pos.to(dev)]

    def gather(
        self, acts_a: Float[Tensor, "B Ta da"], acts_b: Float[Tensor, "B Tb db"], policy: str | None = None
    ) -> tuple[Float[Tensor, "n da"], Float[Tensor, "n db"]]:
        """Paired rows ``(X [n, d_a], Y [n, d_b])``: row i of X and row i of Y pool A's and B's
        activations over the same text (chunk i for "last"/"mean", row i's text for "final").
        `meta(policy)` describes each row."""
        return self.gather_side(acts_a, "a", policy), self.gather_side(acts_b, "b", policy)

    # ---- statistics ---------------------------------------------------------------------
    def coverage(self) -> dict[str, float]:
        """How fine the alignment is (characters are counted once per source text).

        one_to_one_char_coverage: share of the texts' characters that lie in chunks of exactly one
            token on both sides.
        char_coverage: share of the texts' characters that lie in any chunk (1.0 unless rows
            were truncated: chunks tile the text; BOS covers no character).
        one_to_one_chunk_share: share of chunks that are one token on both sides.
        chunks, texts, rows, chunks_per_text, tokens_a/_b (text tokens, BOS excluded),
        tokens_per_chunk_a/_b, chars_per_chunk.
        """
        total_chars = sum(len(t) for t in self.texts)
        width = (self.chunk_char_end - self.chunk_char_start).to(torch.float64)
        one = self.chunk_one_to_one
        n = max(self.n_chunks, 1)
        tok_a = int(self.chunk_n_a.sum())
        tok_b = int(self.chunk_n_b.sum())
        return {
            "one_to_one_char_coverage": float(width[one].sum()) / total_chars,
            "char_coverage": float(width.sum()) / total_chars,
            "one_to_one_chunk_share": float(one.sum()) / n,
            "chunks": float(self.n_chunks),
            "texts": float(len(self.texts)),
            "rows": float(len(self)),
            "chunks_per_text": self.n_chunks / len(self.texts),
            "tokens_a": float(tok_a),
            "tokens_b": float(tok_b),
            "tokens_per_chunk_a": tok_a / n,
            "tokens_per_chunk_b": tok_b / n,
            "chars_per_chunk": float(width.sum()) / n,
        }


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------


def _side(side: str) -> str:
    s = str(side).lower()
    if s not in ("a", "b"):
        raise ValueError(f"side must be 'a' or 'b', got {side!r}")
    return s


@dataclass
class _Encoded:
    """One text as one tokenizer sees it: template prefix, text tokens, template suffix."""

    prefix: list[int]
    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    suffix: list[int]
    bos: int  # index of BOS in prefix, -1 if none


def _check_tokenizer(tok: Any, name: str) -> None:
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


def _pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _encode(tok: Any, texts: list[str], add_bos: bool, name: str) -> list[_Encoded]:
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
            _Encoded(
                prefix, np.asarray(ids[lo:hi], dtype=np.int64), o[:, 0].copy(), o[:, 1].copy(), suffix, bos
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# boundaries
# ---------------------------------------------------------------------------------------------


def _cuts(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _common_cuts(
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


def _byte_positions(text: str) -> np.ndarray:
    """byte_pos[c] = UTF-8 length of text[:c], for c in 0..len(text)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    width = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)]).astype(np.int64)


@dataclass
class _TextChunks:
    pos: np.ndarray  # [C + 1] character boundaries
    ka: np.ndarray  # [C + 1] token boundaries in A's text tokens
    kb: np.ndarray


def _chunk_text(ea: _Encoded, eb: _Encoded, n_chars: int) -> _TextChunks:
    ka, kb, pos = _common_cuts(_cuts(ea.starts, ea.ends), _cuts(eb.starts, eb.ends), n_chars)
    return _TextChunks(
        pos=np.concatenate([[0], pos, [n_chars]]).astype(np.int64),
        ka=np.concatenate([[0], ka, [len(ea.ids)]]).astype(np.int64),
        kb=np.concatenate([[0], kb, [len(eb.ids)]]).astype(np.int64),
    )


# ---------------------------------------------------------------------------------------------
# rows, overflow
# ---------------------------------------------------------------------------------------------


@dataclass
class _Row:
    text: int
    c0: int
    c1: int
    truncated: bool
    window: int


def _row_len(e: _Encoded, k: np.ndarray, c0: int, c1: int, n_chunks: int) -> int:
    return len(e.prefix) + int(k[c1] - k[c0]) + (len(e.suffix) if c1 == n_chunks else 0)


def _max_length(max_length: Any) -> tuple[int, int] | None:
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


def _rows_for_text(
    i: int, ea: _Encoded, eb: _Encoded, ch: _TextChunks, limit: tuple[int, int] | None, overflow: str
) -> list[_Row]:
    n = len(ch.pos) - 1

    def fits(c0: int, c1: int) -> bool:
        return _row_len(ea, ch.ka, c0, c1, n) <= limit[0] and _row_len(eb, ch.kb, c0, c1, n) <= limit[1]

    if limit is None or fits(0, n):
        return [_Row(i, 0, n, False, 0)]
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
        return [_Row(i, 0, c1, True, 0)]
    rows = []
    c0 = 0
    while c0 < n:
        c1 = c0
        while c1 < n and fits(c0, c1 + 1):
            c1 += 1
        if c1 == c0:
            raise no_boundary(c0)
        rows.append(_Row(i, c0, c1, False, len(rows)))
        c0 = c1
    return rows


def _validate_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, got a single string; wrap it in a list")
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: pass at least one non-empty string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        if not t:
            raise ValueError(f"texts[{i}] is an empty string; every text needs at least one character")
    return texts


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
    _check_tokenizer(tok_a, "tok_a")
    _check_tokenizer(tok_b, "tok_b")
    texts = _validate_texts(texts)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    limit = _max_length(max_length)

    enc_a = _encode(tok_a, texts, add_bos, "tok_a")
    enc_b = _encode(tok_b, texts, add_bos, "tok_b")
    chunks = [_chunk_text(ea, eb, len(t)) for ea, eb, t in zip(enc_a, enc_b, texts, strict=True)]
    rows: list[_Row] = []
    for i, (ea, eb, ch) in enumerate(zip(enc_a, enc_b, chunks, strict=True)):
        rows.extend(_rows_for_text(i, ea, eb, ch, limit, overflow))
    byte_pos = [_byte_positions(t) for t in texts]

    pad_a, pad_b = _pad_id(tok_a), _pad_id(tok_b)
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
    rows: list[_Row], enc: list[_Encoded], ks: list[np.ndarray], chunks: list[_TextChunks], pad: int
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


# ---------------------------------------------------------------------------------------------
# inspection and verification
# ---------------------------------------------------------------------------------------------


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
