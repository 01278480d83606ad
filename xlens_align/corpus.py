"""Text corpora for fitting and evaluating alignment maps.

`load(spec)` turns one of these into a deterministic list of passages of bounded length, split
into a train part and a held-out part by a seed:

* ``"pydoc"``: the default, always available with zero install: the prose of CPython's
  Python reference manual (~465k characters), shipped with the package (Python 3.11.7's
  ``pydoc_data.topics.topics``, checksum-verified on load, so the passages are the same on every
  Python version; `passages.pydoc_topics`). Topics are taken in
  sorted order; headings, code / grammar blocks and tables are dropped; the wrapped lines of each
  prose paragraph are joined with single spaces; consecutive paragraphs of a topic are packed
  (joined by a blank line) into passages of at most `max_chars` characters.
* a ``.txt`` / ``.md`` file: its paragraphs (separated by blank lines), each one passage;
  gzip-compressed (``.txt.gz``, ``.md.gz``, e.g. Debian's public-domain Jargon File,
  ``/usr/share/doc/jargon-text/jargon.txt.gz``) is read the same way.
* a folder: the paragraphs of every ``.txt`` / ``.md`` file below it, files in sorted path order;
  a folder written by ``datasets``' ``save_to_disk`` is loaded as a dataset instead.
* a ``.jsonl`` file: the string field `field` (default ``"text"``) of each line's object.
* ``"hf:<name>"`` or ``"hf:<name>:<config>"``: a Hugging Face ``datasets`` dataset that is
  available locally (the hub is never required; the ``datasets`` package is imported lazily).
  A ``datasets.Dataset`` / ``DatasetDict`` object or a list of strings is also accepted.

Every source goes through the same bounding: a passage longer than `max_chars` is split at
sentence ends (else at spaces, else hard), and passages shorter than `min_chars` (after
stripping) are dropped, and exact duplicates are dropped (first occurrence kept; pydoc repeats
some sections under several topics), so no held-out passage also appears in train. The held-out
part is a seeded random subset of the passages, so the two parts are disjoint and the same for the
same seed; both keep the corpus order.

`Corpus.checksum` identifies the passages exactly; `run_info` gathers what a result file records
to be reproduced: package versions, seeds and the corpus (name, checksum, sizes, split seed).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .files import split_indices
from .passages import PYDOC_TOPICS_SHA256, pydoc_passages, split_paragraphs, split_passages
from .validate import nonneg_int, positive_int

__all__ = ["Corpus", "load", "pydoc_passages", "run_info", "split_passages"]

_TEXT_SUFFIXES = (".txt", ".md", ".text")
_HELD_OUT_NAMES = ("held_out", "heldout", "test", "validation", "val")
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Corpus(Sequence[str]):
    """Passages of a corpus (a sequence of all of them, in corpus order) plus a seeded split.

    `train` and `held_out` are disjoint, together hold every passage, and keep the corpus order.
    """

    name: str
    texts: list[str]
    train: list[str]
    held_out: list[str]
    seed: int = 0
    held_out_fraction: float = 0.1
    held_out_index: list[int] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: Any) -> Any:
        return self.texts[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __repr__(self) -> str:
        return (
            f"Corpus({self.name!r}, passages={len(self.texts)}, train={len(self.train)}, "
            f"held_out={len(self.held_out)}, chars={sum(map(len, self.texts))}, seed={self.seed})"
        )

    @property
    def checksum(self) -> str:
        """sha256 (hex) of the passages in order (each UTF-8, prefixed with its byte length): equal
        checksums mean the same texts, whatever the source; the split is fixed by `seed` on top."""
        h = hashlib.sha256()
        for t in self.texts:
            b = t.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON values identifying the corpus: name, checksum, passage / split sizes, split seed."""
        return {
            "name": self.name,
            "checksum": self.checksum,
            "passages": len(self.texts),
            "chars": sum(map(len, self.texts)),
            "train": len(self.train),
            "held_out": len(self.held_out),
            "seed": self.seed,
        }

    def split(self, name: str) -> list[str]:
        """``"train"``, ``"held_out"`` (also ``"test"``, ``"validation"``) or ``"all"``."""
        key = name.lower().replace("-", "_")
        if key == "train":
            return list(self.train)
        if key in _HELD_OUT_NAMES:
            return list(self.held_out)
        if key == "all":
            return list(self.texts)
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {name!r}")


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        if path.suffix.lower() == ".gz":
            try:
                return gzip.decompress(path.read_bytes()).decode("utf-8")
            except (OSError, EOFError) as e:
                raise ValueError(f"{path} is not a readable gzip file: {e}") from e
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text: {e}") from e


def _from_jsonl(path: Path, field_name: str) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a {field_name!r} field")
            if field_name not in obj:
                raise ValueError(
                    f"{path}:{lineno}: no field {field_name!r} (fields: {sorted(obj)}); pass field=<name>"
                )
            value = obj[field_name]
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}:{lineno}: field {field_name!r} is {type(value).__name__}, expected a string"
                )
            out.append(value)
    return out


def _from_folder(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"folder {path} holds no {'/'.join(_TEXT_SUFFIXES)} files")
    out = []
    for f in files:
        out.extend(split_paragraphs(_read_text(f)))
    return out


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "loading a Hugging Face dataset needs the `datasets` package (pip install datasets); "
            "or pass a .txt / .jsonl file or a folder of .txt files"
        ) from e
    return datasets


def _from_dataset(ds: Any, field_name: str, split: str, what: str) -> list[str]:
    if isinstance(ds, dict) or type(ds).__name__ in ("DatasetDict", "IterableDatasetDict"):
        if split not in ds:
            raise ValueError(
                f"{what} has no split {split!r} (splits: {sorted(ds.keys())}); pass dataset_split="
            )
        ds = ds[split]
    cols = getattr(ds, "column_names", None)
    if cols is None:
        raise TypeError(f"{what} is not a datasets.Dataset (got {type(ds).__name__})")
    if field_name not in cols:
        raise ValueError(f"{what} has no column {field_name!r} (columns: {cols}); pass field=<name>")
    values = ds[field_name]
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(
            f"{what}: column {field_name!r} row {bad} is {type(values[bad]).__name__}, expected str"
        )
    return list(values)


def _from_hub_cache(spec: str, field_name: str, split: str) -> list[str]:
    datasets = _import_datasets()
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 2:
        raise ValueError(f"dataset spec must be 'hf:<name>' or 'hf:<name>:<config>', got {spec!r}")
    name, config = parts[0], (parts[1] if len(parts) == 2 else None)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise FileNotFoundError(
            f"dataset {name!r}{f' ({config})' if config else ''} split {split!r} is not available locally "
            f"({type(e).__name__}: {e}); download it where the hub is reachable, or save it with "
            "save_to_disk and pass that folder"
        ) from e
    return _from_dataset(ds, field_name, split, f"dataset {name!r}")


def _raw_passages(spec: Any, field_name: str, dataset_split: str) -> tuple[str, list[str], bool]:
    """(name, paragraphs, pack?) of a spec."""
    if isinstance(spec, (list, tuple)):
        bad = next((i for i, t in enumerate(spec) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"spec[{bad}] must be a str, got {type(spec[bad]).__name__}")
        return "list", list(spec), False
    if hasattr(spec, "column_names") or type(spec).__name__ == "DatasetDict":
        return "dataset", _from_dataset(spec, field_name, dataset_split, "the dataset"), False
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"spec must be 'pydoc', a path, 'hf:<name>', a datasets.Dataset or a list of str, got {type(spec).__name__}"
        )
    if isinstance(spec, str) and spec == "pydoc":
        return "pydoc", [], True
    if isinstance(spec, str) and spec.startswith("hf:"):
        return spec, _from_hub_cache(spec, field_name, dataset_split), False
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {str(spec)!r} not found: not a file or folder, and not a known name ('pydoc', 'hf:<name>')"
        )
    if path.is_dir():
        if any((path / m).exists() for m in _DATASET_MARKERS):
            datasets = _import_datasets()
            return (
                str(path),
                _from_dataset(datasets.load_from_disk(str(path)), field_name, dataset_split, str(path)),
                False,
            )
        return str(path), _from_folder(path), False
    suffix = path.suffix.lower()
    if suffix == ".gz":  # .txt.gz / .md.gz: the suffix inside
        suffix = f"{Path(path.stem).suffix.lower()}.gz"
    if suffix == ".jsonl":
        return str(path), _from_jsonl(path, field_name), False
    if suffix in _TEXT_SUFFIXES or suffix in {f"{s}.gz" for s in _TEXT_SUFFIXES}:
        return str(path), split_paragraphs(_read_text(path)), False
    raise ValueError(f"unsupported corpus file {path}: expected .txt, .md (or .txt.gz, .md.gz), .jsonl or a folder")


def load(
    spec: Any = "pydoc",
    *,
    split: str | None = None,
    seed: int = 0,
    held_out: float | int = 0.1,
    min_chars: int = 40,
    max_chars: int | None = 1500,
    field: str = "text",
    dataset_split: str = "train",
    limit: int | None = None,
    dedup: bool = True,
) -> Corpus | list[str]:
    """Load a corpus as passages; see the module docstring for the accepted `spec`s.

    Args:
        spec: ``"pydoc"``, a ``.txt``/``.md``/``.jsonl`` path, a folder, ``"hf:<name>[:<config>]"``,
            a ``datasets`` dataset, or a list of strings.
        split: None returns the `Corpus`; ``"train"``, ``"held_out"`` or ``"all"`` return that list.
        seed: seed of the train / held-out split (`files.split_indices`: a seeded permutation).
        held_out: fraction of passages held out (in [0, 1)), or an int count.
        min_chars, max_chars: passage length bounds (characters); shorter passages are dropped,
            longer ones split. ``max_chars=None``: no upper bound.
        field: text field of ``.jsonl`` lines and dataset columns.
        dataset_split: which split of a ``datasets`` dataset to read.
        limit: keep only the first `limit` passages (before splitting).
        dedup: drop exact duplicate passages (keeping the first).
    """
    nonneg_int(min_chars, "min_chars")
    if max_chars is not None:
        positive_int(max_chars, "max_chars")
    if limit is not None:
        positive_int(limit, "limit")
    nonneg_int(seed, "seed")
    if max_chars is not None and min_chars > max_chars:
        raise ValueError(f"min_chars ({min_chars}) is larger than max_chars ({max_chars})")
    name, paragraphs, pack = _raw_passages(spec, field, dataset_split)
    if name == "pydoc":
        texts = pydoc_passages(min_chars=min_chars, max_chars=max_chars)
    else:
        texts = split_passages(paragraphs, min_chars=min_chars, max_chars=max_chars, pack=pack)
    if dedup:
        texts = list(dict.fromkeys(texts))
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ValueError(
            f"corpus {name!r} is empty: no passage of at least min_chars={min_chars} characters "
            f"(it had {len(paragraphs) if name != 'pydoc' else 0} paragraphs before bounding)"
        )
    train, held = (idx.tolist() for idx in split_indices(len(texts), held_out, seed))
    corpus = Corpus(
        name=name,
        texts=texts,
        train=[texts[i] for i in train],
        held_out=[texts[i] for i in held],
        seed=seed,
        held_out_fraction=len(held) / len(texts),
        held_out_index=held,
    )
    return corpus if split is None else corpus.split(split)


_VERSIONED = ("xlens-align", "torch", "transformers", "transformer-lens", "tokenizers", "nnsight", "numpy",
              "safetensors")  # fmt: skip


def run_info(*, seed: int | None = None, corpus: Corpus | None = None, **seeds: int | None) -> dict[str, Any]:
    """What a result file records so that it can be reproduced: Python and package versions, the
    seeds (`seed` and any other named seeds, e.g. ``split_seed=0``), and `corpus`'s `describe()`
    (with its checksum) when given; the shipped pydoc text's checksum always.

    >>> info = run_info(seed=0, corpus=xa.corpus.load("pydoc"))
    """
    if corpus is not None and not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a Corpus (xlens_align.corpus.load), got {type(corpus).__name__}")
    named = {"seed": seed, **seeds}
    for k, v in named.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{k} must be an int or None, got {v!r}")
    versions = {}
    for pkg in _VERSIONED:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "platform": sys.platform,
        "packages": versions,
        "seeds": {k: v for k, v in named.items() if v is not None},
        "corpus": None if corpus is None else corpus.describe(),
        "pydoc_topics_sha256": PYDOC_TOPICS_SHA256,
    }
