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

from .assemble import align
from .batch import POLICIES, AlignedBatch, Chunk, Policy, RowMeta
from .check import chunk_texts, decoded_chunk_texts, verify
from .windows import OVERFLOWS, Overflow

__all__ = [
    "OVERFLOWS",
    "POLICIES",
    "AlignedBatch",
    "Chunk",
    "Overflow",
    "Policy",
    "RowMeta",
    "align",
    "chunk_texts",
    "decoded_chunk_texts",
    "verify",
]
