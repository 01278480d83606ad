"""Text into passages: paragraphs, bounded passages (`split_passages`) and the pydoc prose source.

A passage longer than `max_chars` is split at sentence ends (else at spaces, else hard); passages
shorter than `min_chars` (after stripping) are dropped. ``pydoc_passages`` is the prose of
CPython's reference manual: headings, code / grammar blocks, tables and doctests dropped, wrapped
lines joined, consecutive paragraphs of a topic packed into passages.

The manual is not read from the running interpreter's ``pydoc_data`` (it changes between Python
versions, and so would every number measured on it): the package ships Python 3.11.7's
``pydoc_data.topics.topics`` as ``data/pydoc_topics.json.gz``, checked against
`PYDOC_TOPICS_SHA256` (sha256 of the uncompressed JSON) on every load (`pydoc_topics`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources

__all__ = ["PYDOC_TOPICS_SHA256", "pydoc_passages", "pydoc_topics", "split_paragraphs", "split_passages"]

PYDOC_TOPICS_FILE = "pydoc_topics.json.gz"
PYDOC_TOPICS_SHA256 = "4717ccc51e2e7bd1eed2feddb0bcb5a7da19a1a923fd2f258cf81e4285e31683"
"""sha256 of the uncompressed JSON of the shipped topics (Python 3.11.7's ``pydoc_data.topics``)."""


_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


def _pieces(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars`: at sentence ends, else spaces, else hard."""
    if len(text) <= max_chars:
        return [text]
    out: list[str] = []
    for pattern in (_SENTENCE_END, re.compile(r"\s+")):
        parts = [p for p in pattern.split(text) if p]
        if len(parts) > 1:
            sep = " "
            cur = ""
            for p in parts:
                for q in _pieces(p, max_chars) if len(p) > max_chars else [p]:
                    if cur and len(cur) + len(sep) + len(q) > max_chars:
                        out.append(cur)
                        cur = q
                    else:
                        cur = f"{cur}{sep}{q}" if cur else q
            if cur:
                out.append(cur)
            return out
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def split_passages(
    paragraphs: Sequence[str], *, min_chars: int, max_chars: int | None, pack: bool = False
) -> list[str]:
    """Bound paragraphs to passages of `min_chars`..`max_chars` characters.

    With `pack`, consecutive paragraphs are joined (by a blank line) while the passage stays within
    `max_chars`. `max_chars=None` means no upper bound (and packs everything into one passage).
    """
    out: list[str] = []
    cur = ""
    for para in paragraphs:
        para = para.strip()
        if not para:
            continue
        pieces = [para] if max_chars is None else _pieces(para, max_chars)
        for piece in pieces:
            if pack and cur and (max_chars is None or len(cur) + 2 + len(piece) <= max_chars):
                cur = f"{cur}\n\n{piece}"
                continue
            if cur:
                out.append(cur)
            cur = piece
            if not pack:
                out.append(cur)
                cur = ""
    if cur:
        out.append(cur)
    return [p for p in (s.strip() for s in out) if len(p) >= min_chars]


def split_paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines; the first line keeps its indentation."""
    parts = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return [p.strip("\n").rstrip() for p in parts if p.strip()]


def _join_lines(lines: list[str]) -> str:
    """Join wrapped lines with single spaces (a word hyphenated at a line end stays one word)."""
    out = ""
    for ln in (x.strip() for x in lines):
        if not out:
            out = ln
        elif re.search(r"[A-Za-z]-$", out) and ln[:1].islower():
            out += ln
        else:
            out += " " + ln
    return out


# --------------------------------------------------------------------------------------------
# pydoc
# --------------------------------------------------------------------------------------------

_UNDERLINE = re.compile(r"^\s*([*=\-~^+#\"'`])\1{2,}\s*$")


def _pydoc_prose(topic: str) -> list[str]:
    """The prose paragraphs of one pydoc topic, each joined into one line."""
    out = []
    for para in split_paragraphs(topic):
        lines = para.split("\n")
        keep: list[str] = []
        for line in lines:
            if _UNDERLINE.match(line):
                if keep:
                    keep.pop()  # the heading above its underline
                continue
            keep.append(line)
        lines = [ln for ln in keep if ln.strip()]
        if not lines:
            continue
        if all(ln.startswith("   ") for ln in lines):  # literal block: code, grammar, examples
            continue
        if any(ln.lstrip().startswith(("+-", "+=", "| ", ">>>", "...")) for ln in lines):  # tables, doctests
            continue
        out.append(_join_lines(lines))
    return out


@lru_cache(maxsize=1)
def _shipped_topics() -> tuple[tuple[str, str], ...]:
    res = resources.files("xlens_align").joinpath("data", PYDOC_TOPICS_FILE)
    try:
        raw = gzip.decompress(res.read_bytes())
    except (OSError, EOFError) as e:
        raise RuntimeError(
            f"the packaged corpus file {res} is missing, truncated or corrupt ({e}); reinstall xlens-align"
        ) from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != PYDOC_TOPICS_SHA256:
        raise RuntimeError(
            f"the packaged corpus file {res} has sha256 {digest}, expected {PYDOC_TOPICS_SHA256}: "
            "it was changed or damaged; reinstall xlens-align"
        )
    return tuple(sorted(json.loads(raw.decode("utf-8")).items()))


def pydoc_topics() -> dict[str, str]:
    """The shipped reference-manual topics (Python 3.11.7's ``pydoc_data.topics.topics``), checksum
    verified: the same text on every Python version."""
    return dict(_shipped_topics())


def pydoc_passages(
    *, min_chars: int = 40, max_chars: int | None = 1500, topics: Mapping[str, str] | None = None
) -> list[str]:
    """Prose passages of the Python reference manual, deterministic: of the shipped topics
    (`pydoc_topics`) by default, or of `topics` (e.g. ``pydoc_data.topics.topics``)."""
    items = _shipped_topics() if topics is None else sorted(topics.items())
    out: list[str] = []
    for _, text in items:
        out.extend(split_passages(_pydoc_prose(text), min_chars=min_chars, max_chars=max_chars, pack=True))
    return out
