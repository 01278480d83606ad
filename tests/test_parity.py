"""Parity matrix: every point kind of every supported family against Hugging Face's own numbers.

For each family (tiny random-init models built with transformers, every weight perturbed so that
norm gains, biases and attention all matter) and each point kind, the bridge's value
(`LensModel.run_with_points`) is compared with the HF model's:

* ``embed`` and ``resid_pre.L``: ``hidden_states[0]`` and ``hidden_states[L]``;
* ``resid_mid.L``: the input of the norm in front of the MLP, hooked on the HF module
  (``post_attention_layernorm`` for Llama / Mistral / Qwen2; Gemma 3 normalises the attention
  output with its ``post_attention_layernorm`` and adds it to the stream first, so there it is the
  input of ``pre_feedforward_layernorm``);
* ``resid_post.L``: the output of HF decoder layer L (hooked: HF's last ``hidden_states`` entry is
  already normalised);
* ``final``: ``hidden_states[-1]`` (after the final norm); logits: HF's logits.

Padding positions are left out (a batch of two texts of different lengths, longer than the
sliding windows). ``xlens-align demo`` records the same differences for its two models
(results.json ``checks``, against the HF modules the bridge wraps).
"""

from __future__ import annotations

import copy

import pytest
import torch

import xlens_align as xa

FAMILIES = ("llama", "mistral", "qwen2", "gemma3")
KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "final", "logits")
ATOL = {"logits": 1e-5}  # others: 1e-6 (0.0 on CPU: the bridge runs the same HF modules, eager)
N_LAYERS = 3
TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the deep forest.",
    "def square(x):\n    return x ** 2  # émigrés 🙂",
]
_MID_NORM = {"gemma3": "pre_feedforward_layernorm"}  # others: post_attention_layernorm


def tiny_family(family: str, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """(random-init HF causal LM of `family` with 3 layers, tokenizer directory); every parameter
    is perturbed by N(0, 0.05^2) so that no norm gain is 1 and no bias is 0."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    if family in ("llama", "mistral"):
        model, tok = xa.testing.tiny_hf(family, n_layers=N_LAYERS, sliding_window=8, seed=seed)
    else:
        tok = xa.tokenizers.llama3_path()  # any vocabulary does: both sides get the same ids
        small = dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if family == "qwen2":
                model = Qwen2ForCausalLM(Qwen2Config(**small))
            elif family == "gemma3":
                types = ["sliding_attention", "full_attention", "sliding_attention"]
                cfg = Gemma3TextConfig(head_dim=16, sliding_window=8, layer_types=types, **small)
                model = Gemma3ForCausalLM(cfg)
            else:
                raise ValueError(f"unknown family {family!r}")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), tok


def hf_reference(ref: torch.nn.Module, family: str, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, list]:
    """HF's values of every point kind: {kind: [tensor per layer]} (one entry for embed / final /
    logits), read from ``hidden_states`` and forward hooks on the HF modules."""
    layers = ref.model.layers
    mid: list[torch.Tensor] = []
    post: list[torch.Tensor] = []
    norm = _MID_NORM.get(family, "post_attention_layernorm")
    hooks = [getattr(layer, norm).register_forward_hook(lambda m, a, o: mid.append(a[0])) for layer in layers]
    hooks += [layer.register_forward_hook(lambda m, a, o: post.append(o[0] if isinstance(o, tuple) else o))
              for layer in layers]  # fmt: skip
    try:
        with torch.no_grad():
            out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == len(layers) + 1 and len(mid) == len(post) == len(layers)
    return {
        "embed": [hs[0]],
        "resid_pre": list(hs[: len(layers)]),
        "resid_mid": mid,
        "resid_post": post,
        "final": [hs[-1]],
        "logits": [out.logits],
    }


def parity_row(lens: xa.LensModel, ref: torch.nn.Module, texts=TEXTS) -> dict[str, float]:
    """Max abs difference, over layers and real (non-padding) positions, of the bridge's value of
    each point kind against HF's."""
    ids, mask = lens.to_tokens(texts)
    with torch.no_grad():
        logits, acts = lens.run_with_points(ids, mask, lens.points, return_logits=True)
    want = hf_reference(ref, lens.family, ids, mask)
    valid = mask.bool()
    got = {"embed": [acts["embed"]], "final": [acts["final"]], "logits": [logits]}
    for kind in ("resid_pre", "resid_mid", "resid_post"):
        got[kind] = [acts[f"{kind}.{layer}"] for layer in range(lens.n_layers)]
    row = {}
    for kind in KINDS:
        assert len(got[kind]) == len(want[kind]), kind
        row[kind] = max(float((g - w)[valid].abs().max()) for g, w in zip(got[kind], want[kind], strict=True))
    return row


def reference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An untouched copy of an HF model (the bridge changes its model in place) running HF's eager
    attention, the kernel the bridge runs (SDPA alone differs by ~1e-6 here)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def family_model(family: str) -> tuple[xa.LensModel, torch.nn.Module]:
    """(LensModel, HF reference copy) of `tiny_family(family)`."""
    model, tok = tiny_family(family)
    ref = reference_copy(model)
    return xa.load_model(model, tokenizer=tok, name=f"tiny-{family}"), ref


@pytest.fixture(scope="module", params=FAMILIES)
def family_pair(request):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield request.param, *family_model(request.param)
    finally:
        torch.set_num_threads(n)


def test_parity_matrix(family_pair):
    family, lens, ref = family_pair
    assert lens.family == family and lens.n_layers == N_LAYERS
    ids, mask = lens.to_tokens(TEXTS)
    assert mask.sum(1).max() > 2 * 8  # longer than the sliding windows
    row = parity_row(lens, ref)
    bad = {k: v for k, v in row.items() if not v <= ATOL.get(k, 1e-6)}
    assert not bad, f"{family}: bridge differs from HF at {bad} (row {row})"


def test_parity_catches_a_wrong_alias(family_pair):
    """The matrix can fail: each point kind differs from its neighbours' HF values by far more
    than the tolerance (a hook alias pointing one step off would be seen)."""
    family, lens, ref = family_pair
    ids, mask = lens.to_tokens(TEXTS)
    want = hf_reference(ref, family, ids, mask)
    valid = mask.bool()
    for layer in range(N_LAYERS):
        pre, mid, post = (want[k][layer][valid] for k in ("resid_pre", "resid_mid", "resid_post"))
        assert float((pre - mid).abs().max()) > 1e-2 and float((mid - post).abs().max()) > 1e-2
    assert float((want["resid_post"][-1] - want["final"][0])[valid].abs().max()) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_parity_packaged_models(name):
    from transformers import AutoModelForCausalLM

    lens = xa.load_model(name)
    path = str(xa.packaged.materialize(name))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    row = parity_row(lens, ref, TEXTS[:1])
    scale = {k: 1e-3 if k == "logits" else 1e-4 for k in KINDS}  # 30-layer float32 sums
    bad = {k: v for k, v in row.items() if not v <= scale[k]}
    assert not bad, f"{name}: bridge differs from HF at {bad} (row {row})"
