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

__all__ = ["load_hf", "tokenizer_dir"]


def load_hf(source: str, dtype: torch.dtype) -> tuple[torch.nn.Module, str, str]:
    """(hf_model, tokenizer directory, name) for a path / packaged name / hub id."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    if source in packaged.PACKAGED:
        path = packaged.materialize(source)
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype), str(path), source
    p = Path(source).expanduser()
    if p.is_file():
        path = packaged.gguf_to_cache(p)
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype), str(path), p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"source directory {str(p)!r} has no config.json: not a Hugging Face model dir"
            )
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype), str(p), p.name
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1
    if looks_like_path or "/" not in source:
        raise FileNotFoundError(
            f"source {source!r} is not an existing path, a packaged model ({sorted(packaged.PACKAGED)}) "
            "or a hub id of the form 'org/name'"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
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
