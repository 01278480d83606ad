"""Numbers against independent references: a formula written out here, a loop, a closed form or a
direct Hugging Face forward, with tolerances that a plausible bug breaks (issue 11, "Tests that
catch a wrong number"). Each test names the wrong change it was checked to catch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import xlens_align as xa
from xlens_align import scoring
from xlens_align import similarity as S
from xlens_align.fitting.adapter import PlannedRows, patched_loss
from xlens_align.plan import make_plan, read_a
from xlens_align.similarity._util import rank_eps
from xlens_align.similarity.cca import _prep_svcca

F64 = torch.float64
# every word is one token in both Llama 3 and Mistral v1 (checked in `_word_tokens`)
WORDS = "The cat sat on the mat and then the dog ran far away from the old house"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: a tiny forward is much faster on one thread
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ CCA family
def _inv_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return v @ np.diag(w**-0.5) @ v.T


def test_pwcca_weights_are_projections_on_the_canonical_variates():
    """Caught: PWCCA's weights without the singular values (``alpha`` from ``p.T @ vh``)."""
    g = _gen(0)
    n, dx, dy = 600, 6, 5
    z = torch.randn(n, 3, generator=g, dtype=F64)
    x = torch.cat([z, torch.randn(n, dx - 3, generator=g, dtype=F64)], 1)
    x = x * torch.tensor([8.0, 0.5, 3.0, 1.0, 0.2, 5.0], dtype=F64)  # unequal neuron scales
    x = x @ torch.linalg.qr(torch.randn(dx, dx, generator=g, dtype=F64))[0]
    y = torch.cat([z[:, [2, 0]] + 0.3 * torch.randn(n, 2, generator=g, dtype=F64),
                   torch.randn(n, dy - 2, generator=g, dtype=F64)], 1)  # fmt: skip
    # classical CCA written out: whiten, SVD, canonical variates h_i = X_c a_i (unit norm)
    X, Y = x.numpy() - x.numpy().mean(0), y.numpy() - y.numpy().mean(0)
    wx, wy = _inv_sqrt(X.T @ X), _inv_sqrt(Y.T @ Y)
    u, rho, _ = np.linalg.svd(wx @ (X.T @ Y) @ wy)
    k = min(dx, dy)
    H = X @ (wx @ u[:, :k])
    H /= np.linalg.norm(H, axis=0)
    alpha = np.abs(H.T @ X).sum(1)  # sum over neurons j of |<h_i, x_j>|
    alpha /= alpha.sum()
    expected = float((alpha * rho[:k]).sum())
    assert S.pwcca(x, y) == pytest.approx(expected, abs=1e-9)
    assert abs(expected - rho[:k].mean()) > 0.05  # the weights matter here: not the plain mean
    np.testing.assert_allclose(S.canonical_correlations(x, y).numpy(), rho[:k], atol=1e-10)


def test_svcca_keeps_exactly_the_directions_explaining_99_percent():
    """Caught: SVCCA keeping one direction too few (or too many)."""
    g = _gen(1)
    n = 400
    m = torch.randn(n, 16, generator=g, dtype=F64)
    q = torch.linalg.qr(m - m.mean(0))[0]  # orthonormal and centred columns
    sv = torch.tensor([10.0, 6.0, 4.0, 2.5, 1.5, 1.0, 0.6, 0.3, 0.1, 0.05], dtype=F64)
    var = (sv**2).tolist()
    k = next(i + 1 for i in range(len(var)) if sum(var[: i + 1]) / sum(var) >= 0.99)  # hand count
    assert k == 5 and sum(var[:4]) / sum(var) < 0.98  # not a borderline case
    x = (q[:, :10] * sv) @ torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=F64))[0]
    kept = _prep_svcca(x, rank_eps(x), "X", 0.99)
    assert kept.rank == k
    # Y: X's top k-1 directions and 4 directions orthogonal to all of X, equal variance (all kept):
    # canonical correlations k-1 ones and one zero, mean (k-1)/k; k-1 kept gives 1, k+1 gives (k-1)/(k+1)
    y = torch.cat([q[:, : k - 1], q[:, 10:14]], 1) * 2.0
    assert S.svcca(x, y) == pytest.approx((k - 1) / k, abs=1e-9)
    assert S.svcca(x, y, keep=1.0) == pytest.approx((k - 1) / (k - 1 + 4), abs=1e-9)  # min(10, 8) pairs


@pytest.mark.parametrize(("n", "dx", "dy"), [(120, 6, 4), (5, 8, 7)])
def test_procrustes_distance_is_the_residual_of_the_best_rotation(n, dx, dy):
    """Caught: the nuclear norm replaced by the top singular value; inputs not centred."""
    g = _gen(5)
    x = torch.randn(n, dx, generator=g, dtype=F64) + 3.0
    y = x[:, :dy] @ torch.randn(dy, dy, generator=g, dtype=F64) + torch.randn(n, dy, generator=g, dtype=F64)
    xn, yn = x - x.mean(0), y - y.mean(0)
    xn, yn = xn / xn.norm(), yn / yn.norm()
    yn = torch.cat([yn, torch.zeros(n, dx - dy, dtype=F64)], 1)  # the narrower side zero-padded
    u, _, vh = torch.linalg.svd(yn.T @ xn)
    best = float((xn - yn @ (u @ vh)).norm())  # R = U V^T minimises ||X_n - Y_n R|| (orthogonal R)
    assert S.procrustes_distance(x, y) == pytest.approx(best, abs=1e-9)
    for seed in range(5):  # no other rotation does better
        q = torch.linalg.qr(torch.randn(dx, dx, generator=_gen(seed), dtype=F64))[0]
        assert float((xn - yn @ q).norm()) >= best - 1e-12


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_mutual_knn_against_a_loop(metric):
    """Caught: an item counted as its own neighbour."""
    g = _gen(6)
    x = torch.randn(40, 5, generator=g, dtype=F64)
    y = x @ torch.randn(5, 3, generator=g, dtype=F64) + 0.8 * torch.randn(40, 3, generator=g, dtype=F64)

    def neighbours(a, i, k):
        if metric == "cosine":
            a = a / a.norm(dim=1, keepdim=True)
            score = [float(a[i] @ a[j]) for j in range(len(a))]
        else:
            score = [-float((a[i] - a[j]).square().sum()) for j in range(len(a))]
        return set(sorted((j for j in range(len(a)) if j != i), key=lambda j: -score[j])[:k])

    for k in (1, 5):
        ref = sum(len(neighbours(x, i, k) & neighbours(y, i, k)) for i in range(40)) / (40 * k)
        assert S.mutual_knn(x, y, k=k, metric=metric) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("metric", ["correlation", "euclidean"])
def test_rsa_is_spearman_of_the_rdms_written_out(metric):
    """Caught: Pearson instead of Spearman; the RDM's correlation distance on columns."""
    g = _gen(7)
    x = torch.randn(30, 6, generator=g, dtype=F64)
    y = (x @ torch.randn(6, 4, generator=g, dtype=F64)).exp() + 0.5 * torch.randn(
        30, 4, generator=g, dtype=F64
    )

    def rdm(a):
        a = a.numpy()
        i, j = np.triu_indices(len(a), 1)
        if metric == "euclidean":
            return np.linalg.norm(a[i] - a[j], axis=1)
        return 1.0 - np.corrcoef(a)[i, j]  # rows are items

    def ranks(v):
        r = np.empty(len(v))
        r[np.argsort(v)] = np.arange(len(v))
        return r

    rx, ry = ranks(rdm(x)), ranks(rdm(y))
    ref = float(np.corrcoef(rx, ry)[0, 1])
    assert S.rsa(x, y, metric=metric) == pytest.approx(ref, abs=1e-10)
    assert abs(ref - float(np.corrcoef(rdm(x), rdm(y))[0, 1])) > 1e-3  # Pearson would differ


# ------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_is_the_requested_percentiles():
    """Caught: a requested 90% interval returned as an 80% one."""
    x = torch.randn(300, 1, generator=_gen(2), dtype=F64)
    seen: list[float] = []

    def mean0(a, b):
        v = float(a[:, 0].mean())
        seen.append(v)
        return v

    lo, hi = S.bootstrap_ci(mean0, x, x, n_boot=2000, level=0.9, seed=3)
    assert len(seen) == 2000  # every call is one resample
    ref_lo, ref_hi = np.quantile(np.asarray(seen), [0.05, 0.95])
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi), abs=1e-12)
    # and it is a 90% interval of the mean: width 2 * 1.645 * sd / sqrt(n) (80% would be 2 * 1.28)
    width = 2 * 1.6449 * float(x[:, 0].std()) / 300**0.5
    assert hi - lo == pytest.approx(width, rel=0.08)


# ---------------------------------------------------------------------------------------- scoring
def test_kl_to_clean_is_kl_of_clean_to_patched_on_peaked_logits():
    """Caught: KL(patched || clean) instead of KL(clean || patched)."""
    g = _gen(4)
    clean = torch.randn(5, 50, generator=g, dtype=F64) * 8.0
    patched = torch.randn(5, 50, generator=g, dtype=F64) * 8.0
    lp0, lp = clean.log_softmax(-1), patched.log_softmax(-1)
    direct = (lp0.exp() * (lp0 - lp)).sum(-1)
    reverse = (lp.exp() * (lp - lp0)).sum(-1)
    assert (direct - reverse).abs().min() > 0.5  # the direction matters on these logits
    got = scoring.kl_to_clean(patched, scoring.reference(clean))
    torch.testing.assert_close(got, direct, rtol=1e-10, atol=1e-10)
    labels = torch.tensor([0, 3, 7, 9, 49])
    torch.testing.assert_close(scoring.objective_sum("kl", patched, labels, scoring.reference(clean)),
                               direct.sum(), rtol=1e-10, atol=1e-10)  # fmt: skip
    torch.testing.assert_close(scoring.nll(patched, labels), -lp[torch.arange(5), labels], rtol=0, atol=1e-10)


# --------------------------------------------------------------- a peaked pair and HF references
@pytest.fixture(scope="module")
def peaked():
    """(pair, HF copy of A, HF copy of B): B's unembedding scaled x100, so its predictions are
    peaked and KL's two directions differ."""
    hf_a, tok_a = xa.testing.tiny_hf("llama", n_layers=2, seed=0)
    hf_b, tok_b = xa.testing.tiny_hf("mistral", n_layers=2, seed=3)
    with torch.no_grad():
        hf_b.lm_head.weight.mul_(100.0)
    ref_a, ref_b = copy.deepcopy(hf_a), copy.deepcopy(hf_b)
    pair = xa.ModelPair(xa.load_model(hf_a, tokenizer=tok_a), xa.load_model(hf_b, tokenizer=tok_b))
    return pair, ref_a, ref_b


class Linear:
    kind = "linear-test"

    def __init__(self, d: int, seed: int = 0):
        g = _gen(seed)
        self.W, self.c = torch.randn(d, d, generator=g) * 0.5, torch.randn(d, generator=g)

    def transform(self, X):
        return X.float() @ self.W + self.c


def _word_tokens(pair, text):
    """A's and B's ids (with BOS) of a text whose words are single tokens on both sides: the aligned
    chunks are the words, so A is read and B written at every text token (positions 1..n)."""
    ea = pair.a.tokenizer(text, return_offsets_mapping=True)
    eb = pair.b.tokenizer(text, return_offsets_mapping=True)
    ends_a = [e for _, e in ea["offset_mapping"][1:]]
    ends_b = [e for _, e in eb["offset_mapping"][1:]]
    assert ends_a == ends_b and len(ends_a) == len(text.split()), "precondition: one token per word"
    return torch.tensor([ea["input_ids"]]), torch.tensor([eb["input_ids"]])


def _hf_patched_logits(ref_a, ref_b, ids_a, ids_b, transform):
    """A's resid_post.0 (HF hidden_states[1]) at every text token, mapped, written over B's layer-0
    output at the same positions: B's clean and patched logits, by hand."""
    with torch.no_grad():
        x = ref_a(input_ids=ids_a, output_hidden_states=True).hidden_states[1][0, 1:]
        values = transform(x)
        clean = ref_b(input_ids=ids_b).logits[0]

        def write(module, args, out):
            out = out.clone()
            out[0, 1:] = values
            return out

        h = ref_b.model.layers[0].register_forward_hook(write)
        try:
            patched = ref_b(input_ids=ids_b).logits[0]
        finally:
            h.remove()
    return clean.double(), patched.double()


@pytest.mark.filterwarnings("ignore:the ablation at")
def test_measure_kl_matches_a_patched_hf_forward_built_by_hand(peaked):
    """Caught: KL reversed in the scorer (here 1e-3 apart only because B is peaked)."""
    pair, ref_a, ref_b = peaked
    ids_a, ids_b = _word_tokens(pair, WORDS)
    m = Linear(pair.a.d_model)
    clean, patched = _hf_patched_logits(ref_a, ref_b, ids_a, ids_b, m.transform)
    T = ids_b.shape[1]
    t = torch.arange(1, T - 1)  # from the first written position (1) to the last with a label
    lp0, lp = clean[t].log_softmax(-1), patched[t].log_softmax(-1)
    kl = float((lp0.exp() * (lp0 - lp)).sum(-1).mean())
    kl_rev = float((lp.exp() * (lp - lp0)).sum(-1).mean())
    labels = ids_b[0, t + 1]
    ce_clean = float(-lp0[torch.arange(len(t)), labels].mean())
    ce_patched = float(-lp[torch.arange(len(t)), labels].mean())
    top1 = float((lp0.argmax(-1) == lp.argmax(-1)).double().mean())
    assert abs(kl - kl_rev) > 0.1 * kl
    eff = xa.effects.measure(pair, m, source="resid_post.0", target="resid_post.0", texts=[WORDS],
                             ablation="zero")  # fmt: skip
    assert eff.n_tokens == T - 2 and eff.n_patched == T - 1
    assert eff.kl == pytest.approx(kl, rel=1e-4)
    assert (eff.ce_clean, eff.ce_patched) == pytest.approx((ce_clean, ce_patched), rel=1e-4)
    assert eff.top1_agreement == pytest.approx(top1, abs=1e-12)
    # the zero ablation by hand: zeros written at the same cells; recovered from the three CEs
    _, ablated = _hf_patched_logits(ref_a, ref_b, ids_a, ids_b, lambda x: torch.zeros(len(x), pair.b.d_model))
    la = ablated[t].log_softmax(-1)
    ce_ablated = float(-la[torch.arange(len(t)), labels].mean())
    assert eff.ce_ablated == pytest.approx(ce_ablated, rel=1e-4)
    assert eff.kl_ablated == pytest.approx(float((lp0.exp() * (lp0 - la)).sum(-1).mean()), rel=1e-4)
    assert eff.recovered == pytest.approx((ce_ablated - ce_patched) / (ce_ablated - ce_clean), rel=1e-3)


def test_adapter_kl_objective_is_kl_of_clean_to_patched(peaked):
    """Caught: the adapter's KL objective reversed (KL(patched || clean))."""
    pair, ref_a, ref_b = peaked
    ids_a, ids_b = _word_tokens(pair, WORDS)
    m = Linear(pair.a.d_model, seed=1)
    clean, patched = _hf_patched_logits(ref_a, ref_b, ids_a, ids_b, m.transform)
    t = torch.arange(1, ids_b.shape[1] - 1)
    lp0, lp = clean[t].log_softmax(-1), patched[t].log_softmax(-1)
    kl_sum = float((lp0.exp() * (lp0 - lp)).sum())
    rf = xa.RowFilter()
    plan = make_plan(pair, pair.align([WORDS]), rf)
    src, tgt = pair.a.point("resid_post.0"), pair.b.point("resid_post.0")
    with torch.no_grad():
        x, plan = read_a(pair.a, plan, [src], rf)
        total, n = patched_loss(pair.b, tgt, "kl")(m.transform, PlannedRows(x[src], plan))
        ce_total, _ = patched_loss(pair.b, tgt, "ce")(m.transform, PlannedRows(x[src], plan))
    assert n == len(t)
    assert float(total) == pytest.approx(kl_sum, rel=1e-4)
    labels = ids_b[0, t + 1]
    assert float(ce_total) == pytest.approx(float(-lp[torch.arange(len(t)), labels].sum()), rel=1e-5)


# ----------------------------------------------------------------------- which predictions count
MIXED = [  # different lengths (padding in a batch of 3); each starts with a one-token word on both sides
    "The cat sat on the mat.",
    "The tokenizers disagree on unbelievably long words, 12345 and émigrés!",
    "A dog.",
    "The end of a much longer sentence comes here, after many words and a few commas, finally.",
]


@pytest.mark.filterwarnings("ignore:the ablation at")
def test_padding_labels_are_never_scored_batch_size_does_not_matter(peaked):
    """Caught: predictions whose label is padding scored (n_tokens and every mean move with the
    batch size). The count is checked against the token ids; ce_clean against HF per text."""
    pair, _, ref_b = peaked
    m = Linear(pair.a.d_model, seed=2)
    kw = dict(source="resid_post.0", target="resid_post.1", texts=MIXED, ablation="zero")
    one = xa.effects.measure(pair, m, batch_size=1, **kw)
    three = xa.effects.measure(pair, m, batch_size=3, **kw)
    n_hand, nll_sum = 0, 0.0
    for text in MIXED:
        ea = pair.a.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        eb = pair.b.tokenizer(text, return_offsets_mapping=True)
        first = len(text.split()[0])
        assert tuple(ea[1]) == tuple(eb["offset_mapping"][1]) == (0, first)
        ids = torch.tensor([eb["input_ids"]])
        # first chunk = first word, written at B position 1: predictions 1 .. T-2 are scored
        n_hand += ids.shape[1] - 2
        with torch.no_grad():
            lp = ref_b(input_ids=ids).logits[0, 1:-1].double().log_softmax(-1)
        nll_sum += float(-lp[torch.arange(ids.shape[1] - 2), ids[0, 2:]].sum())
    assert one.n_tokens == three.n_tokens == n_hand
    assert one.ce_clean == pytest.approx(nll_sum / n_hand, rel=1e-5)
    for f in ("ce_clean", "ce_patched", "ce_ablated", "kl", "kl_ablated", "top1_agreement", "recovered"):
        assert getattr(one, f) == pytest.approx(getattr(three, f), rel=1e-6, abs=1e-6), f


# ---------------------------------------------------------------------------- row filters, chunks
def _tiling_chunks(tok_a, tok_b, text):
    """Hand alignment of two tokenizations that tile the text: chunk ends are the common token
    ends; each chunk's first token index (from the first text token) on both sides."""
    sides = []
    for tok in (tok_a, tok_b):
        offs = [tuple(o) for o in tok(text, return_offsets_mapping=True)["offset_mapping"][1:]]
        assert all(s == e0 for (s, _), (_, e0) in zip(offs[1:], offs[:-1], strict=True)), "not tiling"
        sides.append(offs)
    ends = sorted({e for _, e in sides[0]} & {e for _, e in sides[1]})
    starts = [0, *ends[:-1]]
    first = [[sum(e <= c for _, e in offs) for offs in sides] for c in starts]
    return first  # [chunk][side] token index of the chunk's first token


def test_drop_first_drops_exactly_the_chunks_starting_in_the_first_k_tokens(tiny_pair):
    """Caught: ``drop_first`` dropping one row too many (or too few)."""
    texts = [
        "Unbelievably, tokenization differs on words like antidisestablishmentarianism here.",
        "The cat sat on the mat.",
        "Short.",
    ]
    chunks = [_tiling_chunks(tiny_pair.a.tokenizer, tiny_pair.b.tokenizer, t) for t in texts]
    assert any(ia != ib for c in chunks for ia, ib in c), "the sides should disagree somewhere"
    for k in (1, 2, 3, 5):
        drop = sum(min(ia, ib) < k for c in chunks for ia, ib in c)
        kept = sum(len(c) for c in chunks) - drop
        got = list(
            xa.collect(tiny_pair, texts, ["embed"], ["embed"], batch_size=2, drop_first=k, progress=False)
        )
        assert sum(pb.filtered.get("drop_first", 0) for pb in got) == drop, k
        assert sum(pb.n for pb in got) == kept, k


def _trimming_tokenizer(texts):
    """A byte-level BPE fast tokenizer whose offsets exclude leading spaces (trim_offsets=True)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 3, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_chunk_char_spans_exact_for_a_tokenizer_that_trims_offsets():
    """Caught: chunk character spans off by the trimmed spaces."""
    texts = ["  two leading spaces,  double  spaces\nand a new line ", "tail   ", "x  y\n\n z"]
    trim = _trimming_tokenizer(["the spaces and a new line tail two leading double x y z"])
    offs = [trim(t, return_offsets_mapping=True)["offset_mapping"] for t in texts]
    assert any(t[s - 1] == " " for t, o in zip(texts, offs, strict=True) for s, e in o if s > 0), (
        "precondition: offsets trimmed"
    )
    llama = xa.tokenizers.llama3()
    for other in (llama, trim):
        batch = xa.tokens.align(trim, other, texts)
        for i, text in enumerate(texts):
            table = batch.chunk_table(i)
            tok_offs = [trim(text, return_offsets_mapping=True)["offset_mapping"],
                        other(text, return_offsets_mapping=True)["offset_mapping"]]  # fmt: skip
            start = 0
            for j, c in enumerate(table):
                # reference: a chunk runs from the previous chunk's end to its own tokens' last end
                # (the last chunk to the end of the text); uncovered characters go with what follows
                ranges = [(c.a_start, c.a_end), (c.b_start, c.b_end)]  # row positions = token indices
                end = max(e for o, (s0, s1) in zip(tok_offs, ranges, strict=True) for _, e in o[s0:s1])
                end = len(text) if j == len(table) - 1 else end
                assert (c.char_start, c.char_end) == (start, end), (text, j)
                for o, (s0, s1) in zip(tok_offs, ranges, strict=True):
                    assert all(start <= s and e <= end for s, e in o[s0:s1])
                start = end
            if other is llama:  # Llama 3 covers every character: its tokens spell the chunk
                got = [llama.decode(batch.input_ids_b[i, c.b_start : c.b_end]) for c in table]
                assert got == [text[c.char_start : c.char_end] for c in table]
