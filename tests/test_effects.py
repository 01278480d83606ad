"""Mapped patches and their effects: self-patch identities, TransformerLens parity, batched grid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xlens_align as xa
from xlens_align import effects as E

TEXTS = [
    "The cat sat on the mat.",
    "Unbelievably, tokenization differs: 12345!",
    "A short one.",
]
HELD_OUT = ["Some held out text here.", "Another one, for the mean!"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The test machines' cores are shared: one intra-op thread avoids OpenMP spin-waits that make
    # a tiny forward 20-40x slower under contention. Restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Identity:
    def transform(self, X):
        return X


class Linear:
    """X @ W + c, with optional declared widths and provenance."""

    kind = "linear-test"

    def __init__(self, d_in: int, d_out: int, seed: int = 0, scale: float = 0.1, provenance=None):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(d_in, d_out, generator=g) * scale
        self.c = torch.randn(d_out, generator=g) * scale
        self.d_in_, self.d_out_ = d_in, d_out
        if provenance is not None:
            self.provenance = provenance

    def transform(self, X):
        return (X.float() @ self.W + self.c).to(X.dtype)


class Zeros:
    def __init__(self, d_out):
        self.d_out = d_out

    def transform(self, X):
        return torch.zeros(X.shape[0], self.d_out, dtype=X.dtype)


@pytest.fixture(scope="module")
def self_pair(tiny_pair):
    return xa.ModelPair(tiny_pair.a, tiny_pair.a)


# ------------------------------------------------------------------------------------------------
# self-patch identities
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["embed", "resid_mid.1", "resid_post.2"])
def test_self_patch_identity_recovers_everything(self_pair, point):
    eff = E.measure(
        self_pair, Identity(), source=point, target=point, texts=TEXTS, ablation="zero", batch_size=2
    )
    assert eff.recovered == pytest.approx(1.0, abs=1e-5)
    assert abs(eff.kl) < 1e-5
    assert eff.top1_agreement == 1.0
    assert eff.ce_patched == pytest.approx(eff.ce_clean, abs=1e-6)
    assert eff.ce_ablated != pytest.approx(eff.ce_clean, abs=1e-4)
    assert eff.n_tokens > 0 and eff.n_patched > 0 and not eff.recovered_undefined
    assert eff.mode == ("inject" if point == "embed" else "patch")


def test_self_patch_mean_ablation_held_out(self_pair):
    eff = E.measure(
        self_pair,
        Identity(),
        source="resid_post.1",
        target="resid_post.1",
        texts=TEXTS,
        ablation_texts=HELD_OUT,
    )
    assert eff.ablation == "mean"
    assert eff.recovered == pytest.approx(1.0, abs=1e-5) and abs(eff.kl) < 1e-5
    assert eff.kl_ablated > 0
    with pytest.warns(UserWarning, match="not held-out"):
        E.measure(self_pair, Identity(), source="resid_post.1", target="resid_post.1", texts=TEXTS[:1])


def test_evaluated_predictions_are_documented_set(tiny_pair):
    """ce_clean equals a hand-computed CE over predictions from the first patched position on."""
    pair = tiny_pair
    b = pair.b
    eff = E.measure(
        pair,
        Zeros(b.d_model),
        source="resid_post.0",
        target="resid_post.0",
        texts=TEXTS[1:2],
        ablation="zero",
        drop_first=2,
    )
    ab = pair.align(TEXTS[1:2])
    meta = ab.meta("last")
    p0 = int(meta.pos_b[meta.start_a.minimum(meta.start_b) >= 3].min())  # drop_first=2: BOS + 2 tokens
    ids = ab.input_ids_b
    with torch.no_grad():
        logits = b.forward(ids, ab.attention_mask_b)
    T = int(ab.lengths_b[0])
    ce = F.cross_entropy(logits[0, p0 : T - 1].double(), ids[0, p0 + 1 : T])
    assert eff.n_tokens == T - 1 - p0
    assert eff.ce_clean == pytest.approx(float(ce), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# TransformerLens parity
# ------------------------------------------------------------------------------------------------


def test_patch_matches_transformer_lens_get_act_patch_resid_pre(tiny_pair):
    from transformer_lens.patching import get_act_patch_resid_pre

    model = tiny_pair.a
    clean, _ = model.to_tokens(["The cat sat on the mat"])
    corrupted, _ = model.to_tokens(["The dog sat on the rug"])
    assert clean.shape == corrupted.shape
    T = clean.shape[1]

    def metric(logits):
        return F.cross_entropy(logits[0, :-1], corrupted[0, 1:])

    with torch.no_grad():
        _, clean_cache = model.bridge.run_with_cache(clean)
        tl = get_act_patch_resid_pre(model.bridge, corrupted, clean_cache, metric)
        ours = torch.zeros(model.n_layers, T)
        for layer in range(model.n_layers):
            acts = clean_cache[f"blocks.{layer}.hook_resid_pre"]
            for pos in range(T):
                with xa.patch(model, f"resid_pre.{layer}", acts[:, pos], positions=torch.tensor([pos])):
                    ours[layer, pos] = metric(model.forward(corrupted))
    assert tl.shape == (model.n_layers, T)
    torch.testing.assert_close(ours, tl.cpu().float(), atol=1e-5, rtol=0)
    assert (tl - tl[0, 0]).abs().max() > 1e-4  # the patch does something somewhere


def test_measure_matches_transformer_lens_generic_patch(self_pair):
    """`measure` with a map that returns the clean run's activations == TL's generic patching
    of all non-BOS positions of each layer's resid_pre, on the same CE metric."""
    from transformer_lens.patching import generic_activation_patch

    model = self_pair.b
    clean_text, corrupted_text = "The cat sat on the mat", "The dog sat on the rug"
    clean, _ = model.to_tokens([clean_text])
    corrupted, _ = model.to_tokens([corrupted_text])
    T = corrupted.shape[1]
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(clean)

    class CleanLookup:
        def __init__(self, layer):
            self.rows = cache[f"blocks.{layer}.hook_resid_pre"][0, 1:]

        def transform(self, X):
            assert X.shape[0] == T - 1  # one aligned chunk per text token
            return self.rows

    def setter(act, index, clean_act):
        act[:, 1:] = clean_act[:, 1:]
        return act

    def metric(logits):  # predictions at positions 1..T-2 (from the first patched position on)
        return F.cross_entropy(logits[0, 1:-1], corrupted[0, 2:])

    import pandas as pd

    with torch.no_grad():
        tl = generic_activation_patch(
            model.bridge,
            corrupted,
            cache,
            metric,
            patch_setter=setter,
            activation_name="resid_pre",
            index_df=pd.DataFrame({"layer": list(range(model.n_layers))}),
        )
    for layer in range(model.n_layers):
        eff = E.measure(
            self_pair,
            CleanLookup(layer),
            source=f"resid_pre.{layer}",
            target=f"resid_pre.{layer}",
            texts=[corrupted_text],
            ablation="zero",
        )
        assert eff.n_patched == T - 1 and eff.n_tokens == T - 2
        assert eff.ce_patched == pytest.approx(float(tl[layer]), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# patch semantics
# ------------------------------------------------------------------------------------------------


def test_zero_map_equals_zero_ablation(tiny_pair):
    b = tiny_pair.b
    eff = E.measure(
        tiny_pair,
        Zeros(b.d_model),
        source="resid_post.1",
        target="resid_post.2",
        texts=TEXTS,
        ablation="zero",
    )
    assert eff.ce_patched == pytest.approx(eff.ce_ablated, abs=1e-7)
    assert eff.kl == pytest.approx(eff.kl_ablated, abs=1e-7)
    assert eff.top1_agreement == eff.top1_ablated
    assert eff.recovered == pytest.approx(0.0, abs=1e-5)


def test_positions_outside_alignment_untouched(tiny_pair):
    a, b = tiny_pair
    m = Linear(a.d_model, b.d_model, seed=3, scale=1.0)
    mp = E.mapped_patch(tiny_pair, m, TEXTS[1:], source="resid_post.2", target="resid_post.1", drop_first=2)
    rows, pos = mp.positions
    touched = torch.zeros_like(mp.input_ids, dtype=torch.bool)
    touched[rows, pos] = True
    real = mp.attention_mask.bool()
    assert (real & ~touched).sum() > len(TEXTS[1:])  # B has non-last chunk tokens besides BOS
    pts = ["resid_post.1", "resid_post.3"]
    with torch.no_grad():
        _, clean = b.run_with_points(mp.input_ids, mp.attention_mask, pts)
        _, patched = b.run_with_points(mp.input_ids, mp.attention_mask, pts, fwd_hooks=mp.hooks(b))
    # at the target: aligned positions hold the mapped values, every other position is clean
    torch.testing.assert_close(patched["resid_post.1"][rows, pos], mp.values, atol=0, rtol=0)
    keep = real & ~touched
    torch.testing.assert_close(patched["resid_post.1"][keep], clean["resid_post.1"][keep], atol=0, rtol=0)
    # downstream: positions before each row's first patched position are clean (causality) ...
    first = torch.full((mp.input_ids.shape[0],), 10**6).scatter_reduce(0, rows, pos, "amin")
    before = torch.arange(mp.input_ids.shape[1])[None] < first[:, None]
    assert before.sum() >= 3 * mp.input_ids.shape[0]
    torch.testing.assert_close(patched["resid_post.3"][before], clean["resid_post.3"][before], atol=0, rtol=0)
    # ... and later ones changed
    assert (
        patched["resid_post.3"][real & ~before] - clean["resid_post.3"][real & ~before]
    ).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# grid
# ------------------------------------------------------------------------------------------------


def test_grid_equals_per_cell_measure(tiny_pair):
    a, b = tiny_pair
    sources, targets = ["resid_post.1", "resid_post.3"], ["embed", "resid_pre.2", "final"]
    maps = {
        (s, t): Linear(a.d_model, b.d_model, seed=10 * i + j)
        for i, s in enumerate(sources)
        for j, t in enumerate(targets)
        if (i, j) != (1, 2)  # a missing cell stays NaN
    }
    kw = dict(ablation="mean", ablation_texts=HELD_OUT, batch_size=2, drop_first=1)
    g = E.grid(tiny_pair, maps, TEXTS, cells_per_forward=3, **kw)
    assert g.sources == sources and g.targets == targets
    assert g.recovered.shape == (2, 3) and math.isnan(g.recovered[1, 2])
    # per text batch (2): one clean pass, then ceil(8 / 3) suffix passes (3 ablations, 5 cells;
    # embed's run all of B's layers)
    assert g.extra["forwards_b"] == 2 * (1 + math.ceil(8 / 3))
    for (s, t), m in maps.items():
        ref = E.measure(tiny_pair, m, source=s, target=t, texts=TEXTS, **kw)
        got = g.effects[(s, t)]
        for f in ("ce_clean", "ce_patched", "ce_ablated", "kl", "top1_agreement", "kl_ablated"):
            assert getattr(got, f) == pytest.approx(getattr(ref, f), abs=1e-5), (s, t, f)
        assert (got.n_tokens, got.n_patched) == (ref.n_tokens, ref.n_patched)
        # recovered divides by CE_ablated - CE_clean (7e-3 here): compare it in CE units
        gap = ref.ce_ablated - ref.ce_clean
        i, j = sources.index(s), targets.index(t)
        assert float(g.recovered[i, j]) == got.recovered
        assert (got.recovered - ref.recovered) * gap == pytest.approx(0, abs=1e-5), (s, t)
        assert g.top1[i, j] == pytest.approx(ref.top1_agreement, abs=1e-5)
    tab = g.table()
    assert len(tab.rows) == 5 and "inject" in tab.text and "embed" in tab.text
    assert {r["mode"] for r in tab.rows} == {"inject", "patch"}


def test_grids_share_one_pass_and_equal_separate_grids(tiny_pair):
    """Two sets of maps on the same cells (and one more target) in one pass: each set's grid equals
    its own `grid` call; clean and ablated runs are computed once and shared."""
    a, b = tiny_pair
    cells = [("resid_post.1", "resid_pre.2"), ("resid_post.3", "embed")]
    sets = {
        "one": {c: Linear(a.d_model, b.d_model, seed=i) for i, c in enumerate(cells)},
        "two": {c: Linear(a.d_model, b.d_model, seed=10 + i) for i, c in enumerate(cells)},
        "three": {("resid_post.1", "final"): Linear(a.d_model, b.d_model, seed=20)},
    }
    kw = dict(ablation="mean", ablation_texts=HELD_OUT, batch_size=2, drop_first=1, cells_per_forward=4)
    gs = E.grids(tiny_pair, sets, TEXTS, n_boot=20, seed=3, **kw)
    assert list(gs) == ["one", "two", "three"]
    # per text batch (2): one clean pass; 3 ablations + 5 cells in ceil(8 / 4) suffix passes
    assert gs["one"].extra["forwards_b"] == 2 * (1 + 2) and gs["one"].extra["shared_with"] == ["two", "three"]
    for k, maps in sets.items():
        ref = E.grid(tiny_pair, maps, TEXTS, n_boot=20, seed=3, **kw)
        got = gs[k]
        assert (got.sources, got.targets) == (ref.sources, ref.targets)
        assert got.ce_clean == pytest.approx(ref.ce_clean, abs=1e-6) and set(got.ce_ablated) == set(ref.ce_ablated)
        for c, e in ref.effects.items():
            f = got.effects[c]
            for name in ("ce_patched", "ce_ablated", "kl", "top1_agreement"):
                assert getattr(f, name) == pytest.approx(getattr(e, name), abs=1e-6), (k, c, name)
            assert (f.recovered - e.recovered) * (e.ce_ablated - e.ce_clean) == pytest.approx(0, abs=1e-6)
            assert f.recovered_ci is not None and len(f.recovered_ci) == 2
    one, two = gs["one"].effects[cells[0]], gs["two"].effects[cells[0]]
    assert one.ce_ablated == two.ce_ablated and one.ce_patched != two.ce_patched
    with pytest.raises(TypeError, match=r"map_sets\['bad'\]: maps keys must be"):
        E.grids(tiny_pair, {"bad": {"resid_post.1": Identity()}}, TEXTS)
    with pytest.raises(ValueError, match="map_sets must be a non-empty dict .*got an empty dict"):
        E.grids(tiny_pair, {}, TEXTS)
    with pytest.raises(ValueError, match="map_sets must be a non-empty dict .*got list"):
        E.grids(tiny_pair, [sets["one"]], TEXTS)


def test_grid_with_fit_function(tiny_pair):
    class Lstsq:  # a map class: fit as Lstsq().fit(X, Y)
        def fit(self, X, Y):
            X1 = torch.cat([X, torch.ones(len(X), 1)], 1).double()
            self.W = torch.linalg.lstsq(X1, Y.double()).solution
            return self

        def transform(self, X):
            return (torch.cat([X, torch.ones(len(X), 1)], 1).double() @ self.W).to(X.dtype)

    g = E.grid(
        tiny_pair,
        Lstsq,
        TEXTS[:2],
        sources=["resid_post.0"],
        targets=["resid_post.0", "resid_post.1"],
        fit_texts=HELD_OUT + TEXTS[2:],
        ablation="zero",
    )
    assert torch.isfinite(g.recovered).all() and g.kl.shape == (1, 2)
    g2 = E.grid(
        tiny_pair,
        {("resid_post.0", "resid_post.1"): lambda X, Y: Lstsq().fit(X, Y)},
        TEXTS[:2],
        fit_texts=HELD_OUT + TEXTS[2:],
        ablation="zero",
    )
    assert g2.recovered[0, 0] == pytest.approx(float(g.recovered[0, 1]), abs=1e-6)
    with pytest.raises(ValueError, match="fit_texts"):
        E.grid(tiny_pair, Lstsq, TEXTS[:1], sources=["resid_post.0"], targets=["resid_post.0"])
    with pytest.raises(TypeError, match="the class Lstsq"):
        E.measure(tiny_pair, Lstsq, source="resid_post.0", target="resid_post.0", texts=TEXTS[:1])


# ------------------------------------------------------------------------------------------------
# generation, tables, recovered undefined
# ------------------------------------------------------------------------------------------------


def test_generate_three_strings_identity_equals_clean(self_pair, tiny_pair):
    out = xa.generate(
        self_pair,
        Identity(),
        "The capital of France is",
        source="resid_post.1",
        target="resid_post.1",
        max_new_tokens=4,
        ablation="zero",
    )
    assert all(isinstance(out[k], str) for k in ("clean", "patched", "ablated"))
    assert out["patched"] == out["clean"] and out["tokens"]["patched"] == out["tokens"]["clean"]
    assert len(out["tokens"]["clean"]) == 4
    a, b = tiny_pair
    out = xa.generate(
        tiny_pair,
        Linear(a.d_model, b.d_model, scale=1.0),
        "Hello there",
        source="resid_post.2",
        target="resid_post.0",
        max_new_tokens=3,
        do_sample=True,
        seed=1,
        ablation_texts=HELD_OUT,
    )
    assert out["ablation"] == "mean" and out["n_patched"] >= 2
    assert all(isinstance(out[k], str) for k in ("clean", "patched", "ablated"))


def _effect(target, clean, patched, ablated):
    from xlens_align.effects.tables import make_effect

    return make_effect(
        "resid_post.0", target, "x", clean, patched, ablated, n_patched=5, ablation="zero", n_texts=1,
        rows=xa.RowFilter(), filtered={}, stacklevel=2,
    )  # fmt: skip


def test_table_and_undefined_recovered():
    from xlens_align.scoring import Sums

    s = Sums(nll=20.0, kl=0.0, top1=2.0, n=2)
    with pytest.warns(RuntimeWarning, match="no loss gap") as rec:
        eff = _effect("embed", s, s, s)
    assert rec[0].filename == __file__  # the warning points at the caller
    assert math.isnan(eff.recovered) and eff.recovered_undefined and "no loss gap" in eff.note
    other = _effect("resid_post.1", s, Sums(21.0, 1.0, 1.0, 2), Sums(22.0, 2.0, 0.0, 2))
    assert other.recovered == pytest.approx(0.5)
    tab = E.table([eff, other])
    assert "nan*" in tab.text and "no loss gap" in tab.text
    assert [r["mode"] for r in tab.rows] == ["inject", "patch"]
    assert tab.rows[1]["recovered"] == pytest.approx(0.5)
    assert other.note == ""
    # an ablation that lowers the loss: recovered is computed, flagged, and the table says why
    with pytest.warns(RuntimeWarning, match="lowers B's loss"):
        inverted = _effect(
            "resid_post.1", Sums(22.0, 0.0, 2.0, 2), Sums(21.0, 1.0, 1.0, 2), Sums(20.0, 2.0, 0.0, 2)
        )
    assert inverted.recovered == pytest.approx(0.5) and not inverted.recovered_undefined
    assert "scale is inverted" in inverted.note
    assert "scale is inverted" in E.table([inverted]).text


def test_measure_warnings_point_at_the_caller(tiny_pair):
    a, b = tiny_pair
    zero = Linear(a.d_model, b.d_model)
    with pytest.warns(UserWarning, match="not held-out texts") as rec:
        E.measure(tiny_pair, zero, source="resid_post.1", target="resid_post.1", texts=TEXTS[:2])
    assert {w.filename for w in rec} == {__file__}


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_points_and_widths(tiny_pair):
    a, b = tiny_pair
    m = Linear(a.d_model, b.d_model)
    kw = dict(texts=TEXTS[:1], ablation="zero")
    with pytest.raises(ValueError, match=r"source: model A .*unknown point 'resid_poost.1'.*valid points"):
        E.measure(tiny_pair, m, source="resid_poost.1", target="resid_post.1", **kw)
    with pytest.raises(ValueError, match=r"target: model B .*out of range"):
        E.measure(tiny_pair, m, source="resid_post.1", target="resid_post.9", **kw)
    with pytest.raises(ValueError, match=r"output width d_out_=32 .*d_model=64"):
        E.measure(tiny_pair, Linear(a.d_model, 32), source="resid_post.1", target="resid_post.1", **kw)
    with pytest.raises(ValueError, match=r"input width d_in_=48 .*d_model=64"):
        E.measure(tiny_pair, Linear(48, b.d_model), source="resid_post.1", target="resid_post.1", **kw)

    class Undeclared:  # no d_out_: caught on the output
        def transform(self, X):
            return X[:, :10]

    with pytest.raises(ValueError, match=r"map output has shape .*d_model=64"):
        E.measure(tiny_pair, Undeclared(), source="resid_post.1", target="resid_post.1", **kw)
    with pytest.raises(TypeError, match="transform"):
        E.measure(tiny_pair, object(), source="resid_post.1", target="resid_post.1", **kw)
    with pytest.raises(ValueError, match="ablation must be one of"):
        E.measure(tiny_pair, m, source="resid_post.1", target="resid_post.1", texts=TEXTS, ablation="gauss")


def test_bad_patch_values(tiny_pair):
    b = tiny_pair.b
    ids, mask = b.to_tokens(TEXTS[:1])
    with pytest.raises(ValueError, match="hidden size"), xa.patch(b, "resid_post.1", torch.zeros(3, 32)):
        pass
    with pytest.raises(ValueError, match="are on meta"):
        with xa.patch(b, "resid_post.1", torch.zeros(3, b.d_model, device="meta")):
            pass
    with pytest.raises(TypeError, match="dtype torch.float64"):
        with xa.patch(b, "resid_post.1", torch.zeros(3, b.d_model, dtype=torch.float64)):
            pass


def test_provenance_mismatch(tiny_pair):
    a, b = tiny_pair
    kw = dict(texts=TEXTS[:1], ablation="zero")

    def lin(**prov):
        return Linear(a.d_model, b.d_model, provenance=prov)

    # matching provenance (negative layers normalised) passes
    ok = lin(
        source="resid_post.-1", target="resid_post.1", model_id_a=a.model_id, config_hash_b=b.config_hash
    )
    E.measure(tiny_pair, ok, source="resid_post.3", target="resid_post.1", **kw)
    with pytest.raises(ValueError, match=r"source: expected 'resid_post.1', found 'resid_post.2'"):
        E.measure(tiny_pair, lin(source="resid_post.2"), source="resid_post.1", target="resid_post.1", **kw)
    with pytest.raises(ValueError, match=r"target: expected 'embed', found 'resid_pre.0'"):
        E.measure(tiny_pair, lin(target="resid_pre.0"), source="resid_post.1", target="embed", **kw)
    with pytest.raises(ValueError, match=r"model_id_b: expected 'tiny-mistral.*', found 'other-model'"):
        E.measure(
            tiny_pair, lin(model_id_b="other-model"), source="resid_post.1", target="resid_post.1", **kw
        )
    with pytest.raises(ValueError, match=r"config_hash_a: expected"):
        E.grid(tiny_pair, {("resid_post.1", "resid_post.1"): lin(config_hash_a="abc")}, **kw)
    # a real alignment map bound to other points / other models
    X, Y = torch.randn(40, a.d_model), torch.randn(40, b.d_model)
    m = xa.maps.Procrustes().fit(X, Y).bind(a=a, b=b, source="resid_post.2", target="resid_post.2")
    with pytest.raises(ValueError, match=r"target: expected 'resid_post.1', found 'resid_post.2'"):
        E.measure(tiny_pair, m, source="resid_post.2", target="resid_post.1", **kw)
    swapped = xa.ModelPair(b, a)
    with pytest.raises(ValueError, match=r"model_id_a: expected .*config_hash_a"):
        E.check_map(swapped, m, "resid_post.2", "resid_post.2")


def test_everything_filtered_names_the_texts_that_were_used(tiny_pair):
    a, b = tiny_pair
    m = Linear(a.d_model, b.d_model)
    kw = dict(source="resid_post.1", target="resid_post.1", drop_first=500)
    with (
        pytest.warns(UserWarning, match="not held-out"),
        pytest.raises(ValueError, match=r"^texts \(used for"),
    ):
        E.measure(tiny_pair, m, texts=TEXTS, **kw)
    with pytest.raises(ValueError, match=r"^ablation_texts: no aligned position"):
        E.measure(tiny_pair, m, texts=TEXTS, ablation_texts=HELD_OUT, **kw)
