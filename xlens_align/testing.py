"""Small random-init models with the real Llama 3 and Mistral v1 vocabularies.

`tiny_llama` has grouped-query attention (4 query heads share 2 K/V heads by default);
`tiny_mistral` has a sliding window (16 tokens by default) shorter than typical test
sequences, so the window is exercised. Both are deterministic given `seed`. They are what the
test suite runs on; they are useful for trying the pipeline without a trained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["tiny_hf", "tiny_llama", "tiny_mistral"]


def tiny_hf(
    family: str = "llama",
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    sliding_window: int | None = 16,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> tuple[torch.nn.Module, Path]:
    """(random-init HF causal LM, tokenizer directory) for `family` in {'llama', 'mistral'}."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from . import tokenizers

    if d_model % n_heads or n_heads % n_kv_heads:
        raise ValueError(
            f"d_model ({d_model}) must be divisible by n_heads ({n_heads}) and n_heads by n_kv_heads ({n_kv_heads})"
        )
    common: dict[str, Any] = dict(
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    if family == "llama":
        tok_dir = tokenizers.llama3_path()
        cfg = LlamaConfig(
            vocab_size=128256, bos_token_id=128000, eos_token_id=128001, rope_theta=500000.0, **common
        )
        cls = LlamaForCausalLM
    elif family == "mistral":
        tok_dir = tokenizers.mistral_v1_path()
        cfg = MistralConfig(
            vocab_size=32000, bos_token_id=1, eos_token_id=2, sliding_window=sliding_window, **common
        )
        cls = MistralForCausalLM
    else:
        raise ValueError(f"family must be 'llama' or 'mistral', got {family!r}")
    cfg._name_or_path = f"tiny-{family}-L{n_layers}-d{d_model}-s{seed}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg).eval()
    return model, tok_dir


def tiny_llama(*, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw: Any):
    """A random-init Llama (GQA) with Meta's Llama 3 vocabulary, wrapped as a `LensModel`."""
    from .models import load_model

    model, tok_dir = tiny_hf("llama", **kw)
    return load_model(model, tokenizer=tok_dir, device=device, dtype=dtype, name=model.config._name_or_path)


def tiny_mistral(*, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw: Any):
    """A random-init Mistral (sliding window, GQA) with the Mistral v1 vocabulary, as a `LensModel`."""
    from .models import load_model

    model, tok_dir = tiny_hf("mistral", **kw)
    return load_model(model, tokenizer=tok_dir, device=device, dtype=dtype, name=model.config._name_or_path)
