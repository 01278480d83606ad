"""The data an alignment produces: `AlignedBatch` (both tokenizations of a batch and their aligned
chunks), `Chunk` (one chunk of one row) and `RowMeta` (what each gathered row is), plus pooling."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["POLICIES", "AlignedBatch", "Chunk", "Policy", "RowMeta"]

Policy = Literal["last", "mean", "final"]
POLICIES: tuple[str, ...] = ("last", "mean", "final")


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


def _side(side: str) -> str:
    s = str(side).lower()
    if s not in ("a", "b"):
        raise ValueError(f"side must be 'a' or 'b', got {side!r}")
    return s
