"""B run from a residual point on (`suffix.Suffix`), the scores made from it (`plan.score_variants`,
`scoring.metrics_hidden`) and the functional grid on top: the same numbers as full patched forwards."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import xlens_align as xa
from xlens_align import effects as E
from xlens_align import plan as P
from xlens_align.patching import forward_patched
from xlens_align.rows import RowFilter
from xlens_align.scoring import metrics, metrics_hidden, reference, reference_hidden
from xlens_align.suffix import Suffix, supported

TEXTS = [
    "The quick brown fox jumps over the lazy dog, then it runs far into the forest.",
    "Hi there.",
    "Unbelievably, tokenization differs: 12345!",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def tiny(family: str, n_layers: int = 4):
    """A random-init LensModel of `family`, all with the Mistral v1 vocabulary (GQA; sliding
    windows of 4 tokens where the family has them: Mistral on every layer, Qwen2 on its upper
    layers, Gemma 3 on alternate local layers with their own rotary base, plus Gemma's final
    logit soft-capping)."""
    if family == "mistral":
        hf, tok = xa.testing.tiny_hf(family, n_layers=n_layers, sliding_window=4, seed=3)
        return xa.load_model(hf, tokenizer=tok)
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    small = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        if family == "llama":
            hf = LlamaForCausalLM(LlamaConfig(**small))
        elif family == "qwen2":
            cfg = Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=2, **small)
            hf = Qwen2ForCausalLM(cfg)
        else:
            types = ["sliding_attention", "full_attention"] * (n_layers // 2)
            cfg = Gemma3TextConfig(head_dim=16, sliding_window=4, layer_types=types, final_logit_softcapping=5.0,
                                   **small)  # fmt: skip
            hf = Gemma3ForCausalLM(cfg)
    return xa.load_model(hf.eval(), tokenizer=xa.tokenizers.mistral_v1_path())


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "gemma3"])
def model(request):
    return tiny(request.param)


def _patched(m, ids, mask, streams):
    """Full patched forwards (reference) and the suffix's inputs for `streams` = [(point, k)]:
    k replicates of the batch per point, each with its own values at a few cells."""
    B, T = ids.shape
    g = torch.Generator().manual_seed(0)
    cells = (torch.tensor([0, 1, 2, 2]), torch.tensor([T - 3, 1, 0, 4]))
    _, acts = m.run_with_points(ids, mask, [p for p, _ in streams])
    inputs, refs = [], []
    for p, k in streams:
        h = acts[p].repeat(k, 1, 1)
        vals = torch.randn(k * 4, m.d_model, generator=g) * 3
        at = (cells[0].repeat(k) + torch.arange(k).repeat_interleave(4) * B, cells[1].repeat(k))
        h[at] = vals
        inputs.append((p, h))
        with torch.no_grad():
            refs.append(forward_patched(m, ids.repeat(k, 1), mask.repeat(k, 1), {p: (vals, at)}))
    return inputs, torch.cat(refs)


def test_suffix_logits_equal_the_full_patched_forward(model):
    ids, mask = model.to_tokens(TEXTS)  # right-padded rows of different lengths
    B, T = ids.shape
    assert T > 8 and (mask == 0).any()  # longer than the window of 4; padding present
    names = ("embed", "resid_pre.0", "resid_post.0", "resid_pre.2", "resid_post.3", "final")
    pts = [model.point(n) for n in names]
    assert all(supported(model, p) for p in pts)
    assert not supported(model, model.point("resid_mid.1"))
    sfx = Suffix(model, ids, mask)
    # one point at a time, and all of them stacked in one pass (each layer run once)
    for group in [[(p, 2)] for p in pts] + [[(p, k) for p, k in zip(pts, (2, 1, 2, 1, 2, 2), strict=True)]]:
        streams, ref = _patched(model, ids, mask, group)
        R = ref.shape[0]
        rows, pos = torch.nonzero(mask.repeat(R // B, 1), as_tuple=True)
        with torch.no_grad():
            z = sfx.logits(streams, (rows, pos))
        assert (z - ref[rows, pos]).abs().max() < 1e-5, (model.family, [p.name for p, _ in group])
        assert (z - ref[rows, pos]).abs().max() < 1e-3 * (ref[rows, pos] - ref[rows, pos].mean()).abs().max()
    # the patch matters: the clean run differs at the written cells' later positions
    with torch.no_grad():
        clean = model.forward(ids, mask)
    assert (clean[0, T - 2] - ref[0, T - 2]).abs().max() > 1e-3


def test_suffix_left_padding_positions():
    m = tiny("llama")  # the same model as the parametrized one (cached)
    ids, mask = m.to_tokens(TEXTS)
    lengths = mask.sum(1)
    left_ids, left_mask = torch.full_like(ids, m.pad_token_id), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):  # the same texts, left-padded
        left_ids[i, -n:], left_mask[i, -n:] = ids[i, :n], 1
    p = m.point("resid_pre.1")
    streams, ref = _patched(m, left_ids, left_mask, [(p, 2)])
    rows, pos = torch.nonzero(left_mask.repeat(2, 1), as_tuple=True)
    with torch.no_grad():
        z = Suffix(m, left_ids, left_mask).logits(streams, (rows, pos))
    assert (z - ref[rows, pos]).abs().max() < 1e-5


def test_suffix_refuses_unsorted_streams():
    m = tiny("llama")
    ids, mask = m.to_tokens(TEXTS[:1])
    sfx = Suffix(m, ids, mask)
    h = torch.zeros(1, ids.shape[1], m.d_model)
    with pytest.raises(ValueError, match="sorted by depth"):
        sfx.hidden([(m.point("resid_pre.1"), h), (m.point("resid_pre.0"), h)])
    with pytest.raises(ValueError, match="final streams must come last"):
        sfx.final_rows(
            [(m.point("final"), h), (m.point("resid_pre.0"), h)], (torch.zeros(1, dtype=torch.long),) * 2
        )


@pytest.mark.parametrize("linear", [True, False])
def test_metrics_hidden_equal_metrics_on_logits(linear):
    g = torch.Generator().manual_seed(0)
    m, d, V, k = 7, 16, 300, 3
    W = torch.randn(V, d, generator=g)
    unembed = (lambda h: h @ W.T) if linear else (lambda h: torch.tanh(h @ W.T / 4) * 4)
    h0 = torch.randn(m, d, generator=g)
    h = h0 + 0.3 * torch.randn(k, m, d, generator=g)
    h[1, 2] = h0[2]  # a variant equal to clean at one prediction: KL 0, top-1 agrees
    labels = torch.randint(0, V, (m,), generator=g)
    ref = reference_hidden(h0, unembed, W if linear else None)
    assert (ref.q is not None) == linear
    want = metrics(unembed(h), labels, reference(unembed(h0)))
    for block in (None, 1, 5):
        got = metrics_hidden(h.reshape(k * m, d), unembed, labels, ref, block=block)
        for x, y in zip(got, want, strict=True):
            assert torch.allclose(x.view(k, m).double(), y.double(), atol=1e-5, rtol=0), block
    assert abs(float(want[1][1, 2])) < 1e-5 and bool(want[2][1, 2])


def test_top1_agreement_on_ties_is_argmax():
    """Exact ties at the maximum: agreement follows argmax (the first maximum)."""
    z0 = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    ref = reference(z0)  # clean tops: 1 and 0
    z = torch.tensor([[2.0, 2.0, 0.0], [3.0, 3.0, 0.0]])  # row 0: argmax 0 (tie); row 1: argmax 0
    rows = z.clone()
    got = metrics_hidden(rows, lambda x: x, torch.tensor([0, 1]), ref)[2]
    assert got.tolist() == (z.argmax(-1) == ref.top).tolist() == [False, True]


def _variants(b, plan, targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    vs = [(None, None)]
    for t in targets:
        v = torch.randn(plan.n_patched, b.d_model, generator=g)
        vs.append((b.point(t), v if len(vs) % 2 else (lambda v=v: v)))  # values or a function
    return vs


def test_score_variants_equal_full_forwards(tiny_pair, monkeypatch):
    a, b = tiny_pair
    plan = next(P.plans(tiny_pair, TEXTS, batch_size=3, rows=RowFilter(drop_first=1)))
    targets = ["resid_post.3", "resid_pre.0", "final", "resid_mid.1", "resid_post.1", "embed", "resid_pre.0"]
    vs = _variants(b, plan, targets)
    got, want, counts = {}, {}, {}
    with torch.no_grad():
        for js, s in P.score_variants(b, plan, vs, 3, counts):
            got.update({j: [x[i] for x in s] for i, j in enumerate(js)})
        monkeypatch.setattr(P, "_SUFFIX", False)
        for js, s in P.score_variants(b, plan, vs, 3):
            want.update({j: [x[i] for x in s] for i, j in enumerate(js)})
    assert sorted(got) == sorted(want) == list(range(len(vs)))
    # one clean pass, one full forward (resid_mid), ceil(6 / 3) suffix passes
    assert counts["forwards"] == 1 + 1 + math.ceil(6 / 3)
    for j in range(len(vs)):
        for x, y in zip(got[j], want[j], strict=True):
            assert x.shape == (plan.n_scored,)
            assert torch.allclose(x.double(), y.double(), atol=1e-5, rtol=0), (j, vs[j][0])
    assert float(got[0][1].abs().max()) < 1e-6 and bool(got[0][2].all())  # clean: KL 0, top-1 1


def test_grid_suffix_equals_full_forwards(tiny_pair, monkeypatch):
    a, b = tiny_pair
    sources, targets = (
        ["resid_post.1", "resid_post.3"],
        ["embed", "resid_pre.0", "resid_post.2", "resid_mid.2", "final"],
    )
    g = torch.Generator().manual_seed(1)
    maps = {
        (s, t): _Lin(torch.randn(a.d_model, b.d_model, generator=g) / 8) for s in sources for t in targets
    }
    kw = dict(ablation="mean", ablation_texts=TEXTS[1:], batch_size=2, drop_first=1, cells_per_forward=5)
    fast = E.grid(tiny_pair, maps, TEXTS, **kw)
    monkeypatch.setattr(P, "_SUFFIX", False)
    full = E.grid(tiny_pair, maps, TEXTS, **kw)
    for c, e in full.effects.items():
        f = fast.effects[c]
        for name in (
            "ce_clean",
            "ce_patched",
            "ce_ablated",
            "kl",
            "top1_agreement",
            "kl_ablated",
            "top1_ablated",
        ):
            assert getattr(f, name) == pytest.approx(getattr(e, name), abs=1e-5), (c, name)
        assert (f.recovered - e.recovered) * (e.ce_ablated - e.ce_clean) == pytest.approx(0, abs=1e-5)
        assert (f.n_tokens, f.n_patched) == (e.n_tokens, e.n_patched)
    for key, t in full.text_sums.items():
        assert torch.allclose(fast.text_sums[key], t, atol=1e-4, rtol=0), key


class _Lin:
    def __init__(self, W):
        self.W = W

    def transform(self, X):
        return X @ self.W
