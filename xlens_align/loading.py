"""Where `load_model`'s pieces come from: the HF model behind a source, and a tokenizer directory.

TransformerLens wants a tokenizer saved to a directory; a tokenizer object is saved once into the
cache under a name derived from its files. Nothing here needs TransformerLens itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import packaged

__all__ = ["TOKENIZER_FILES", "check_device", "check_tokenizer_files", "load_hf", "tokenizer_dir"]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tekken.json")


def check_device(device: Any) -> torch.device:
    """`device` as a `torch.device`, refused (ValueError naming it) when this machine cannot run on
    it; `load_model` calls it before reading any weight."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:<i>' or 'mps', got {device!r} ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "mps":
        count = int(torch.backends.mps.is_available())
    elif dev.type in ("cuda", "xpu"):
        backend = getattr(torch, dev.type)
        count = backend.device_count() if backend.is_available() else 0
    else:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:<i>' or 'mps', got {device!r}")
    if count == 0:
        raise ValueError(
            f"device={device!r}, but this torch {torch.__version__} sees no {dev.type} device; use device='cpu'"
        )
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"device={device!r}, but only {count} {dev.type} device(s) are visible (0..{count - 1})"
        )
    return dev


def check_tokenizer_files(directory: Path, what: str) -> None:
    """FileNotFoundError, suggesting ``tokenizer=``, when `directory` holds no tokenizer files."""
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{what} {str(directory)!r} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "pass tokenizer=<the model's tokenizer directory or object> to load_model"
        )


def load_hf(source: str, dtype: torch.dtype, need_tokenizer: bool = True) -> tuple[torch.nn.Module, str, str]:
    """(hf_model, tokenizer directory, name) for a path / packaged name / hub id. With
    `need_tokenizer`, a model directory without tokenizer files is refused before its weights load."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if source in packaged.PACKAGED:
        path = packaged.materialize(source)
        return packaged.load_causal_lm(str(path), dtype), str(path), source
    p = Path(source).expanduser()
    if p.is_file():
        path = packaged.gguf_to_cache(p)
        return packaged.load_causal_lm(str(path), dtype), str(path), p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"source directory {str(p)!r} has no config.json: not a Hugging Face model dir"
            )
        if need_tokenizer:
            check_tokenizer_files(p, "model directory")
        return packaged.load_causal_lm(str(p), dtype), str(p), p.name
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1
    if looks_like_path or "/" not in source:
        raise FileNotFoundError(
            f"source {source!r} is not an existing path, a packaged model ({sorted(packaged.PACKAGED)}) "
            "or a hub id of the form 'org/name'"
        )
    try:
        model = packaged.load_causal_lm(source, dtype)
    except OSError as e:
        raise FileNotFoundError(
            f"hub id {source!r} is not available: no hub reachable and not in the local HF cache ({e})"
        ) from e
    return model, source, source


def tokenizer_dir(tokenizer: Any) -> Path:
    """A directory holding the tokenizer (saving an in-memory one into the cache)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        p = Path(tokenizer).expanduser()
        if p.is_dir():
            check_tokenizer_files(p, "tokenizer directory")
            return p
        if "/" in str(tokenizer) and not p.exists() and str(tokenizer).count("/") == 1:
            return Path(str(tokenizer))  # hub id served by the local cache
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} does not exist")
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a directory or an HF tokenizer, got {type(tokenizer).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        digest = hashlib.sha256()
        for f in sorted(Path(tmp).iterdir()):
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
        dest = packaged.cache_dir() / "tokenizers" / f"saved-{digest.hexdigest()[:16]}"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=dest.parent))
            for f in Path(tmp).iterdir():
                shutil.copy2(f, staging / f.name)
            with contextlib.suppress(OSError):
                staging.rename(dest)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return dest
