"""Building the Llama 3 and Mistral v0.1 fast tokenizers from their source files, and their ids.

`build_llama3` converts Meta's tiktoken ranks file, `build_mistral_v1` the SentencePiece BPE model;
`xlens_align.tokenizers` locates the files, caches the result on disk and documents the behaviour.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "LLAMA3_BASE_VOCAB",
    "LLAMA3_BOS_ID",
    "LLAMA3_EOS_ID",
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKENS",
    "MISTRAL_V1_BOS_ID",
    "MISTRAL_V1_EOS_ID",
    "MISTRAL_V1_UNK_ID",
    "MISTRAL_V1_VOCAB",
    "build_llama3",
    "build_mistral_v1",
]

#: Llama 3 pre-tokenization regex (``llama_models.llama3.tokenizer.Tokenizer.pat_str``).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMED_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
#: The 256 Llama 3 special tokens in id order (ids 128000..128255), as Meta's tokenizer defines them.
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = _LLAMA3_NAMED_SPECIAL + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_NAMED_SPECIAL))
)
LLAMA3_BOS_ID = 128000
LLAMA3_EOS_ID = 128001
LLAMA3_BASE_VOCAB = 128000

MISTRAL_V1_UNK_ID = 0
MISTRAL_V1_BOS_ID = 1
MISTRAL_V1_EOS_ID = 2
MISTRAL_V1_VOCAB = 32000


def _read_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one ``<base64 token> <rank>`` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def build_llama3(model_file: Path) -> PreTrainedTokenizerFast:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _LocalRanksConverter(TikTokenConverter):
        # tiktoken's own loader would also copy the file into a cache under /tmp; read it directly.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return _read_tiktoken_ranks(tiktoken_url)

    converter = _LocalRanksConverter(
        vocab_file=str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS)
    )
    backend = converter.converted()  # Split(regex) + ByteLevel pre-tokenizer, ByteLevel decoder
    if backend.get_vocab_size() != LLAMA3_BASE_VOCAB + len(LLAMA3_SPECIAL_TOKENS):
        raise RuntimeError(f"unexpected Llama 3 vocabulary size {backend.get_vocab_size()} from {model_file}")
    for i, name in enumerate(LLAMA3_SPECIAL_TOKENS):
        if backend.token_to_id(name) != LLAMA3_BASE_VOCAB + i:
            raise RuntimeError(f"special token {name} did not get id {LLAMA3_BASE_VOCAB + i}")
    bos, eos = LLAMA3_SPECIAL_TOKENS[0], LLAMA3_SPECIAL_TOKENS[1]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, LLAMA3_BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        add_bos_token=True,
        add_eos_token=False,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def _sentencepiece_bpe_merges(
    pieces: list[str], scores: list[float], mergeable: set[str]
) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces,
    ordered by the merged piece's score (higher first), then its id, then the split's ids."""
    ids = {p: i for i, p in enumerate(pieces)}
    keyed: list[tuple[float, int, int, int, str, str]] = []
    for i, piece in enumerate(pieces):
        if piece not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                keyed.append((-scores[i], i, ids[left], ids[right], left, right))
    keyed.sort()
    return [(left, right) for *_, left, right in keyed]


def build_mistral_v1(model_file: Path) -> PreTrainedTokenizerFast:
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    if n != MISTRAL_V1_VOCAB:
        raise RuntimeError(f"unexpected Mistral v1 vocabulary size {n} from {model_file}")
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    special = {i: pieces[i] for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    if special != {MISTRAL_V1_UNK_ID: "<unk>", MISTRAL_V1_BOS_ID: "<s>", MISTRAL_V1_EOS_ID: "</s>"}:
        raise RuntimeError(f"unexpected control pieces {special} in {model_file}")
    # Byte pieces (<0x00>..<0xFF>) and control pieces never take part in merges.
    mergeable = {
        p
        for i, p in enumerate(pieces)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    model = models.BPE(
        vocab={p: i for i, p in enumerate(pieces)},
        merges=_sentencepiece_bpe_merges(pieces, scores, mergeable),
        unk_token="<unk>",
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(
        [AddedToken(special[i], special=True, normalized=False) for i in sorted(special)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", MISTRAL_V1_BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
