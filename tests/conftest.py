"""Shared fixtures: tiny random-init models with the real vocabularies, and SmolLM2-135M."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llama_ref():
    """(LensModel, untouched HF copy) of a 3-layer Llama with GQA and the Llama 3 vocabulary."""
    import xlens_align as xa

    hf, tok = xa.testing.tiny_hf("llama", n_layers=3, seed=0)
    ref = copy.deepcopy(hf)
    return xa.load_model(hf, tokenizer=tok, name="tiny-llama"), ref


@pytest.fixture(scope="session")
def tiny_mistral_ref():
    """(LensModel, untouched HF copy) of a 3-layer Mistral, sliding window 16, Mistral v1 vocab."""
    import xlens_align as xa

    hf, tok = xa.testing.tiny_hf("mistral", n_layers=3, seed=1, sliding_window=16)
    ref = copy.deepcopy(hf)
    return xa.load_model(hf, tokenizer=tok, name="tiny-mistral"), ref


@pytest.fixture(scope="session")
def tiny_pair():
    """A tiny Llama (A) and tiny Mistral (B) of 4 layers each, as a ModelPair."""
    import xlens_align as xa

    return xa.ModelPair(
        xa.testing.tiny_llama(n_layers=4, seed=0), xa.testing.tiny_mistral(n_layers=4, seed=1)
    )


@pytest.fixture(scope="session")
def smollm2():
    import xlens_align as xa

    return xa.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    import xlens_align as xa

    return xa.load_model("gemma3-270m")
