"""Real Llama 3 and Mistral 7B v0.1 tokenizers, built offline from files that PyPI packages carry.

No model hub is needed. The source files come from two packages installed with ``--no-deps``:

- Llama 3: Meta's tiktoken ranks file ``llama_models/llama3/tokenizer.model``
  (``pip install --no-deps llama-models==0.3.0``), 128,000 byte-level BPE tokens + 256 special tokens.
- Mistral v0.1: the SentencePiece BPE model ``mistral_common/data/tokenizer.model.v1``
  (``pip install --no-deps mistral-common==1.13.1``), 32,000 pieces with byte fallback.

Each is converted once into a Hugging Face fast tokenizer, saved with ``save_pretrained`` into
``<cache>/tokenizers/llama3`` or ``<cache>/tokenizers/mistral_v1`` (``<cache>`` is ``cache_dir``, else
``$XLENS_ALIGN_CACHE``, else ``~/.cache/xlens_align``) and reloaded from there afterwards (about a
second). The directory is written atomically (built in a temporary sibling, checked, then renamed)
and carries a stamp with the sha256 of the source file and the library versions; a stale or broken
copy is rebuilt. ``llama3_path()`` / ``mistral_v1_path()`` give the directory, which is what
TransformerLens wants (``TransformerBridge.boot_transformers(..., tokenizer=<loaded from that path>)``).

Behaviour, checked against the reference encoders in ``tests/test_tokenizers.py``:

- ids: ``tok(text).input_ids`` equals ``llama_models.llama3.tokenizer.Tokenizer.encode(text, bos=True,
  eos=False)`` and ``[1] + sentencepiece.SentencePieceProcessor(v1).encode(text)``. BOS is added
  (``<|begin_of_text|>`` = 128000, ``<s>`` = 1), EOS is never appended (``<|end_of_text|>`` = 128001,
  ``</s>`` = 2). Mistral's unk is ``<unk>`` = 0. **No pad token is set** on either tokenizer: set
  one (e.g. ``tok.pad_token = tok.eos_token``) before padded batching.
- Special-token strings inside the text are tokenized as plain text (``split_special_tokens=True``),
  like the reference encoders: ``"<s>"`` gives ``▁<``, ``s``, ``>`` and ``"<|eot_id|>"`` gives ``<``,
  ``|``, ``e``, ... Chat templates therefore have to be encoded piecewise with the special ids inserted
  by hand.
- ``decode(ids, skip_special_tokens=True)`` equals the reference decoders (no
  ``clean_up_tokenization_spaces``), so decode(encode(text)) == text for Llama 3 always and for
  Mistral whenever SentencePiece round-trips too (a literal ``"▁"`` in the text comes back as ``" "``).
- Every call returns a new tokenizer object (about 1 s to load Llama 3, 0.1 s Mistral); a first build
  takes a few seconds.
- After ``from_pretrained(path)`` (``AutoTokenizer`` or ``PreTrainedTokenizerFast``, transformers 5.24)
  BOS is still added, by the ``TemplateProcessing`` post-processor stored in ``tokenizer.json``, but
  such a copy reports ``add_bos_token == False``; setting ``add_eos_token`` on it would rebuild the
  post-processor *without* BOS. The objects returned by :func:`llama3` / :func:`mistral_v1` have
  ``add_bos_token = True`` set, so they are safe to reconfigure.

Offsets (``tok(text, return_offsets_mapping=True).offset_mapping``) are character offsets into the
original ``text``. For both tokenizers: the BOS token reports ``(0, 0)``; every other token has
``0 <= s < e <= len(text)``; starts and ends are non-decreasing; no character is skipped (each token
starts at or before the previous token's end), so taking from each token only the characters past
the previous token's end rebuilds ``text`` exactly. Offsets do *not* always tile the text without
overlap:

- Llama 3 (byte-level BPE): a token that holds only some of the UTF-8 bytes of a character reports
  the whole character, so the 3-4 byte pieces of one emoji or CJK character that has no token of
  its own all report the same ``(s, e)`` (e.g. ``"👍"`` -> three tokens, each ``(i, i+1)``). A token
  holding bytes of two characters spans both, and overlaps its neighbour. Leading spaces are kept
  in the offsets (no offset trimming): ``" world"`` is one token covering the space.
- Mistral v0.1 (SentencePiece): the text is normalized by prepending ``"▁"`` and replacing every
  ``" "`` with ``"▁"``. The prepended ``"▁"`` has no character of its own and is charged to the
  first character. When it merges into the first word (``"Hello"`` -> ``▁Hello``) the first token
  is simply ``(0, 5)``: offsets never include a space that is not in the text. When it stays a
  token by itself, which happens when the text starts with a character that does not join it
  (a space, a newline, a digit, many CJK characters, emoji, ...), that ``▁`` token reports the first
  character, ``(0, len(first char))``, which the next token covers again: ``" lead"`` ->
  ``▁`` ``(0, 1)``, ``▁lead`` ``(0, 5)``; ``"\\nx"`` -> ``▁`` ``(0, 1)``, ``<0x0A>`` ``(0, 1)``, ...
  A space in the text belongs to the token that starts with its ``▁`` (``" world"`` -> ``(5, 11)``).
  Byte-fallback pieces (``<0xF0>`` ``<0x9F>`` ...) of one character all report that whole character,
  e.g. ``"👨"`` -> four tokens, each ``(i, i+1)``; a character's offsets cover the full Python
  character, whatever its number of UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .tokenizer_build import (
    LLAMA3_BASE_VOCAB,
    LLAMA3_BOS_ID,
    LLAMA3_EOS_ID,
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    MISTRAL_V1_BOS_ID,
    MISTRAL_V1_EOS_ID,
    MISTRAL_V1_UNK_ID,
    MISTRAL_V1_VOCAB,
    build_llama3,
    build_mistral_v1,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "LLAMA3_BOS_ID",
    "LLAMA3_EOS_ID",
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKENS",
    "MISTRAL_V1_BOS_ID",
    "MISTRAL_V1_EOS_ID",
    "MISTRAL_V1_UNK_ID",
    "default_cache_dir",
    "llama3",
    "llama3_model_file",
    "llama3_path",
    "mistral_v1",
    "mistral_v1_model_file",
    "mistral_v1_path",
]

# Bump whenever the construction (tokenizer_build.py) changes: cached directories with another stamp are rebuilt.
_BUILD_FORMAT = 1
_STAMP_FILE = "xlens_align_tokenizer.json"


@dataclass(frozen=True)
class _Source:
    """Where a tokenizer's source file lives and how to get it."""

    package: str  # importable package holding the file
    resource: str  # path inside that package, "/"-separated
    pip: str  # distribution==version to install


_LLAMA3_SOURCE = _Source("llama_models", "llama3/tokenizer.model", "llama-models==0.3.0")
_MISTRAL_V1_SOURCE = _Source("mistral_common", "data/tokenizer.model.v1", "mistral-common==1.13.1")


def _source_file(source: _Source) -> Path:
    """Locate `source` on disk, or raise ImportError / FileNotFoundError naming the pip command."""
    hint = f"install it with `pip install --no-deps {source.pip}`"
    try:
        root = importlib.resources.files(source.package)
    except ImportError as exc:
        raise ImportError(
            f"the tokenizer file {source.resource} comes from the Python package {source.package!r}, "
            f"which is not installed; {hint}"
        ) from exc
    entry = root.joinpath(*source.resource.split("/"))
    if not isinstance(entry, Path) or not entry.is_file():
        raise FileNotFoundError(
            f"{source.package} is installed but {source.resource} was not found in it as a regular file "
            f"({entry}); {hint}"
        )
    return entry


def llama3_model_file() -> Path:
    """Path of Meta's Llama 3 tiktoken ranks file inside the installed `llama-models` package."""
    return _source_file(_LLAMA3_SOURCE)


def mistral_v1_model_file() -> Path:
    """Path of the Mistral v0.1 SentencePiece model inside the installed `mistral-common` package."""
    return _source_file(_MISTRAL_V1_SOURCE)


def default_cache_dir() -> Path:
    """``$XLENS_ALIGN_CACHE`` if set, else ``~/.cache/xlens_align``."""
    env = os.environ.get("XLENS_ALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xlens_align"


# ------------------------------------------------------------------------------- cache on disk


@dataclass(frozen=True)
class _Kind:
    name: str
    source: _Source
    build: Callable[[Path], PreTrainedTokenizerFast]
    vocab_size: int
    bos_id: int
    eos_id: int


_LLAMA3 = _Kind(
    "llama3",
    _LLAMA3_SOURCE,
    build_llama3,
    LLAMA3_BASE_VOCAB + len(LLAMA3_SPECIAL_TOKENS),
    LLAMA3_BOS_ID,
    LLAMA3_EOS_ID,
)
_MISTRAL_V1 = _Kind(
    "mistral_v1",
    _MISTRAL_V1_SOURCE,
    build_mistral_v1,
    MISTRAL_V1_VOCAB,
    MISTRAL_V1_BOS_ID,
    MISTRAL_V1_EOS_ID,
)


def _stamp(kind: _Kind, model_file: Path) -> dict[str, object]:
    import tokenizers
    import transformers

    return {
        "kind": kind.name,
        "format": _BUILD_FORMAT,
        "source": f"{kind.source.pip}:{kind.source.resource}",
        "source_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _stamp_matches(directory: Path, stamp: dict[str, object]) -> bool:
    try:
        return json.loads((directory / _STAMP_FILE).read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


def _load_checked(directory: Path, kind: _Kind) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer and check that it still adds BOS and has the expected vocabulary."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    # transformers 5.x drops add_bos_token from the saved config; the saved post-processor still adds
    # BOS. Setting it rebuilds the same template and keeps later add_eos_token changes from losing BOS.
    tok.add_bos_token = True
    ids = tok("hi").input_ids
    if len(tok) != kind.vocab_size or tok.bos_token_id != kind.bos_id or tok.eos_token_id != kind.eos_id:
        raise RuntimeError(
            f"{kind.name} tokenizer in {directory} has vocab {len(tok)}, bos {tok.bos_token_id}, "
            f"eos {tok.eos_token_id}; expected {kind.vocab_size}, {kind.bos_id}, {kind.eos_id}"
        )
    if not ids or ids[0] != kind.bos_id or ids.count(kind.bos_id) != 1:
        raise RuntimeError(f"{kind.name} tokenizer in {directory} does not add BOS {kind.bos_id}: {ids}")
    return tok


def _publish(tmp: Path, target: Path, stamp: dict[str, object]) -> None:
    """Move the finished build `tmp` to `target`, replacing a stale copy; a valid copy that another
    process published meanwhile wins (then `tmp` is left for the caller to delete)."""
    for _ in range(5):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if not target.exists():
                continue  # vanished between the attempts: try again
        if _stamp_matches(target, stamp):
            return
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.rename(target, stale)
        except OSError:
            continue
        shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"could not publish the tokenizer built in {tmp} to {target}")


def _ensure(kind: _Kind, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Return the tokenizer directory of `kind`, building it first if it is absent or stale."""
    model_file = _source_file(kind.source)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "tokenizers" / kind.name
    stamp = _stamp(kind, model_file)
    if _stamp_matches(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind.name}.build-", dir=target.parent))
    try:
        kind.build(model_file).save_pretrained(str(tmp))
        _load_checked(tmp, kind)  # check the saved form before anyone can see it
        (tmp / _STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, target, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _get(kind: _Kind, cache_dir: str | os.PathLike[str] | None) -> PreTrainedTokenizerFast:
    path = _ensure(kind, cache_dir)
    try:
        return _load_checked(path, kind)
    except Exception:
        # A cached copy that no longer loads or checks out (e.g. edited by hand): rebuild it once.
        (path / _STAMP_FILE).unlink(missing_ok=True)
        return _load_checked(_ensure(kind, cache_dir), kind)


def llama3_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the saved Llama 3 tokenizer (``tokenizer.json`` etc.), built if absent."""
    return _ensure(_LLAMA3, cache_dir)


def mistral_v1_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the saved Mistral v0.1 tokenizer, built if absent."""
    return _ensure(_MISTRAL_V1, cache_dir)


def llama3(cache_dir: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerFast:
    """Llama 3 tokenizer (128,256 ids), matching Meta's ``Tokenizer.encode(text, bos=True, eos=False)``."""
    return _get(_LLAMA3, cache_dir)


def mistral_v1(cache_dir: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerFast:
    """Mistral 7B v0.1 tokenizer (32,000 ids), matching SentencePiece's encoding with ``<s>`` prepended."""
    return _get(_MISTRAL_V1, cache_dir)
