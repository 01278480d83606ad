"""Pipelines that fit maps on model pairs (`xlens_align.fitting`): the adapter trained through B,
the embedding injection, fit_grid, real models."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import xlens_align as xa
import xlens_align.maps as xm
from xlens_align.fitting import fit_grid, fit_injection, train_adapter
from xlens_align.fitting.adapter import PlannedRows, patched_loss
from xlens_align.maps import CCA, MLP, Adapter, Affine, EmbeddingInjection, LowRank, Procrustes, load
from xlens_align.maps.base import PROVENANCE_KEYS
from xlens_align.plan import make_plan, read_a
from xlens_align.stats import CrossStats

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x + 1",
    "Hello world, again and again and again.",
    "Numbers: 1, 2, 3 and four, five.",
]
VAL = ["A small held-out sentence here.", "Another one, for validation only."]
SRC, TGT = "resid_post.2", "resid_post.1"


def rows(pair, texts, src, tgt, **kw):
    """Concatenated raw (X, Y) rows of `collect`."""
    data = xa.activations.collect_all(pair, texts, [src], [tgt], progress=False, **kw)
    return data.a[src], data.b[tgt]


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()},
        [p.requires_grad for p in model.hf_model.parameters()],
    )


def assert_untouched(model, snap):
    state, flags = snap
    now = model.hf_model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state), "B's weights changed"
    assert [p.requires_grad for p in model.hf_model.parameters()] == flags
    assert all(p.grad is None for p in model.hf_model.parameters()), "B's parameters got gradients"


def assert_no_hooks(model):
    left = [name for name, hp in model.bridge.hook_dict.items() if hp.has_hooks()]
    assert not left, f"hooks left on the bridge: {left[:5]}"


def patched_ce(pair, m, texts, **kw):
    """B's patched CE through the effects pipeline (the one plan and scorer)."""
    return xa.effects.measure(pair, m, source=SRC, target=TGT, texts=texts, ablation="zero", **kw).ce_patched


# -- the trained adapter -------------------------------------------------------------------------
def test_adapter_validation_loss_is_effects_ce(tiny_pair, tmp_path):
    """The adapter's own losses and effects.measure agree on the same texts and map (one scorer)."""
    snap_b, snap_a = snapshot(tiny_pair.b), snapshot(tiny_pair.a)
    ad = train_adapter(
        tiny_pair, source=SRC, target=TGT, texts=TEXTS, init=None, steps=12, lr=1e-2, batch_size=2,
        val_texts=VAL, patience=10,
    )  # fmt: skip
    assert isinstance(ad, Adapter) and ad.init_ == "random"
    assert ad.final_train_loss_ < ad.init_train_loss_ - 0.05
    assert ad.best_val_loss_ < ad.init_val_loss_
    assert [h["step"] for h in ad.history_][:2] == [0, 2]  # one check per pass over 2 batches
    assert ad.d_in_ == tiny_pair.a.d_model and ad.d_out_ == tiny_pair.b.d_model
    assert_untouched(tiny_pair.b, snap_b)
    assert_untouched(tiny_pair.a, snap_a)
    assert_no_hooks(tiny_pair.b)
    assert_no_hooks(tiny_pair.a)
    # the best weights are restored: effects.measure's CE on the validation texts is the best
    # validation loss, and on the training texts the final training loss (same CE to 1e-5)
    assert patched_ce(tiny_pair, ad, VAL, batch_size=2) == pytest.approx(ad.best_val_loss_, abs=1e-5)
    assert patched_ce(tiny_pair, ad, TEXTS, batch_size=2) == pytest.approx(ad.final_train_loss_, abs=1e-5)
    prov = ad.provenance
    assert (prov["source"], prov["target"], prov["objective"]) == (SRC, TGT, "ce")
    assert prov["model_id_b"] == tiny_pair.b.model_id and prov["alignment"] == "last"
    # saves and loads like every map
    X, _ = rows(tiny_pair, VAL, SRC, TGT)
    ad2 = load(ad.save(tmp_path / "ad.safetensors"), a=tiny_pair.a, b=tiny_pair.b)
    assert type(ad2) is Adapter and ad2.history_ == ad.history_
    assert torch.equal(ad2.transform(X), ad.transform(X))
    with pytest.raises(TypeError, match="loss"):
        Adapter(objective="ce").fit(X, X)


def test_adapter_starts_from_closed_form_map(tiny_pair):
    X, Y = rows(tiny_pair, TEXTS, SRC, TGT, batch_size=2)
    m = Affine(alpha=1.0).fit(X, Y)
    ref = patched_ce(tiny_pair, m, TEXTS, batch_size=2)
    # a negligible learning rate: the adapter stays the map it started from
    still = train_adapter(
        tiny_pair, source=SRC, target=TGT, texts=TEXTS, init=m, steps=1, lr=1e-12, batch_size=2
    )
    assert still.init_ == "map:affine"
    torch.testing.assert_close(still.transform(X), m.transform(X), rtol=1e-4, atol=1e-4)
    assert still.init_train_loss_ == pytest.approx(ref, abs=1e-5)
    # from init="affine" (fitted on the collected rows), and the loss goes down
    ad = train_adapter(tiny_pair, source=SRC, target=TGT, texts=TEXTS, steps=6, lr=1e-2, batch_size=2)
    assert ad.init_ == "affine" and len(ad.history_) >= 2
    assert ad.history_[0]["step"] == 0 and ad.history_[-1]["step"] == 6
    assert ad.final_train_loss_ < ad.init_train_loss_
    assert ad.best_val_loss_ is None and not ad.stopped_early_
    # continuing from an adapter starts exactly where it stopped
    more = train_adapter(
        tiny_pair, source=SRC, target=TGT, texts=TEXTS, init=ad, steps=1, lr=1e-12, batch_size=2
    )
    assert more.init_ == "adapter"
    assert more.init_train_loss_ == pytest.approx(ad.final_train_loss_, rel=1e-5)
    with pytest.raises(ValueError, match="init must be"):
        train_adapter(tiny_pair, source=SRC, target=TGT, texts=TEXTS, init="cca", steps=1)
    with pytest.raises(ValueError, match="objective"):
        train_adapter(tiny_pair, source=SRC, target=TGT, texts=TEXTS, objective="mse", steps=1)


def test_adapter_kl_objective_and_mlp(tiny_pair):
    snap = snapshot(tiny_pair.b)
    kw = dict(source=SRC, target=TGT, texts=TEXTS)
    ad = train_adapter(tiny_pair, **kw, objective="kl", init=None, steps=4, lr=1e-2, batch_size=2)
    assert ad.objective == "kl"
    assert 0.0 <= ad.final_train_loss_ < ad.init_train_loss_
    # the KL the training reports is effects' KL(clean || patched) on the same predictions
    eff = xa.effects.measure(tiny_pair, ad, **kw, ablation="zero", batch_size=2)
    assert eff.kl == pytest.approx(ad.final_train_loss_, abs=1e-5)
    mlp = train_adapter(tiny_pair, **kw, base="mlp", hidden=16, steps=2, lr=1e-3, batch_size=2)
    assert mlp.base == "mlp" and mlp.final_train_loss_ < mlp.init_train_loss_ + 1e-3
    # an MLP map (same architecture) starts an MLP adapter as itself
    X, Y = rows(tiny_pair, TEXTS, SRC, TGT, batch_size=2)
    net = MLP(hidden=16, epochs=2, progress=False).fit(X, Y)
    from_net = train_adapter(tiny_pair, **kw, base="mlp", hidden=16, init=net, steps=1, lr=1e-12)
    assert from_net.init_ == "mlp"
    torch.testing.assert_close(from_net.transform(X), net.transform(X), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="base='mlp'"):
        train_adapter(tiny_pair, **kw, init=net, steps=1)
    assert_untouched(tiny_pair.b, snap)
    assert_no_hooks(tiny_pair.b)


def test_padding_never_scored(tiny_pair):
    X, Y = rows(tiny_pair, TEXTS, SRC, TGT)
    m = Affine(alpha=1.0).fit(X, Y)
    ab = tiny_pair.align(TEXTS)
    pad_b = ab.attention_mask_b == 0
    assert pad_b.any(), "the batch needs padding for this test"
    other = dataclasses.replace(
        ab,
        input_ids_a=torch.where(ab.attention_mask_a == 0, 13, ab.input_ids_a),
        input_ids_b=torch.where(pad_b, 13, ab.input_ids_b),
    )
    assert not torch.equal(other.input_ids_b, ab.input_ids_b)
    rf = xa.RowFilter()
    src, tgt = tiny_pair.a.point(SRC), tiny_pair.b.point(TGT)
    losses = {}
    for name, batch in (("clean", ab), ("other", other)):
        plan = make_plan(tiny_pair, batch, rf)
        r, c = plan.score_at
        assert bool(plan.mask_b[r, c + 1].all()), "a scored prediction has a padding label"
        with torch.no_grad():
            x, plan = read_a(tiny_pair.a, plan, [src], rf)
            for objective in ("ce", "kl"):
                total, n = patched_loss(tiny_pair.b, tgt, objective)(m.transform, PlannedRows(x[src], plan))
                losses[name, objective] = float(total) / n
    for objective in ("ce", "kl"):
        assert losses["clean", objective] == pytest.approx(losses["other", objective], rel=1e-6, abs=1e-7)


def test_hooks_removed_and_flags_restored_on_error(tiny_pair, monkeypatch):
    b = tiny_pair.b
    snap = snapshot(b)
    forward = b.bridge.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # fails inside a training step, with the patch hook installed
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(b.bridge, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        train_adapter(tiny_pair, source=SRC, target=TGT, texts=TEXTS, steps=4, batch_size=2)
    monkeypatch.undo()
    assert calls["n"] > 3
    assert_no_hooks(b)
    assert_untouched(b, snap)


# -- embedding injection ---------------------------------------------------------------------------
def test_embedding_injection(tiny_pair, tmp_path):
    inj = fit_injection(tiny_pair, source=SRC, texts=TEXTS, base="affine", alpha=1.0, drop_first=1)
    prov = inj.provenance
    assert prov["target"] == "embed" and prov["source"] == SRC
    assert prov["model_id_a"] == tiny_pair.a.model_id and prov["positions"]["drop_first"] == 1
    X, Y = rows(tiny_pair, TEXTS, SRC, "embed", drop_first=1)
    ref = Affine(alpha=1.0).fit(X, Y)
    torch.testing.assert_close(inj.transform(X), ref.transform(X), rtol=1e-6, atol=1e-6)
    assert EmbeddingInjection().provenance["target"] == "embed"
    with pytest.raises(ValueError, match="embed"):
        inj.bind(target="resid_post.1")
    # save / load, checked against the models
    inj2 = load(inj.save(tmp_path / "inj.safetensors"), a=tiny_pair.a, b=tiny_pair.b)
    assert type(inj2) is EmbeddingInjection and inj2.provenance == inj.provenance
    assert torch.equal(inj2.transform(X), inj.transform(X))
    assert inj2.get_params() == {"base": "affine", "base_params": {"alpha": 1.0}}
    # other bases, given as instances or names, with their own state (an MLP's module included)
    for base, params in (
        (Procrustes(scale=True), None),
        ("mlp", {"hidden": 8, "epochs": 2, "progress": False}),
    ):
        e = EmbeddingInjection(base, params).fit(X, Y)
        e2 = load(e.save(tmp_path / "e.safetensors"))
        assert torch.equal(e2.transform(X), e.transform(X))
        assert e2.provenance["target"] == "embed"
    mlp = fit_injection(tiny_pair, source=SRC, texts=TEXTS, base="mlp", hidden=8, epochs=2, progress=False)
    assert mlp.base_map_.kind == "mlp"
    # measured where effects code applies maps: patched at B's "embed" point
    eff = xa.effects.measure(
        tiny_pair, inj, source=SRC, target="embed", texts=TEXTS, ablation="zero", drop_first=1
    )
    assert eff.mode == "inject" and eff.ce_patched > 0
    with pytest.raises(ValueError, match="base must be"):
        EmbeddingInjection("adapter").fit(X, Y)


# -- fit_grid ----------------------------------------------------------------------------------------
POINTS_A = ["resid_post.1", "resid_post.3"]
POINTS_B = ["resid_pre.1", "resid_post.2"]
# enough rows (~250) for well-posed fits in d_model = 64: Procrustes and CCA are not unique when n < d
LONG = [
    " ".join(f"Item {i * 7 + j} of list {i} costs {j * 3}.{j} dollars, {w}." for j, w in enumerate(words))
    for i, words in enumerate(
        [
            ["red", "green", "blue", "gray", "pink"],
            ["one", "two", "three", "four", "five"],
            ["cat", "dog", "bird", "fish", "frog"],
        ]
    )
]


def raw_rows(pair, texts, **kw):
    xs, ys = {p: [] for p in POINTS_A}, {p: [] for p in POINTS_B}
    for pb in xa.collect(pair, texts, POINTS_A, POINTS_B, progress=False, **kw):
        for p in POINTS_A:
            xs[p].append(pb.a[p])
        for p in POINTS_B:
            ys[p].append(pb.b[p])
    return {p: torch.cat(v) for p, v in xs.items()}, {p: torch.cat(v) for p, v in ys.items()}


def test_fit_grid_equals_separate_fits(tiny_pair):
    kw = {"drop_first": 1, "batch_size": 2}
    xs, ys = raw_rows(tiny_pair, LONG, **kw)
    xv, yv = raw_rows(tiny_pair, VAL, **kw)
    assert xs[POINTS_A[0]].shape[0] > 2 * tiny_pair.a.d_model
    cases = [
        ("affine", {"alpha": "cv"}, lambda: Affine(alpha="cv")),
        ("procrustes", {"scale": True}, lambda: Procrustes(scale=True)),
        ("lowrank", {"rank": 5, "alpha": 0.1}, lambda: LowRank(rank=5, alpha=0.1)),
        ("cca", {"k": 4}, lambda: CCA(k=4)),
    ]
    for kind, params, make in cases:
        maps = fit_grid(tiny_pair, LONG, POINTS_A, POINTS_B, kind=kind, val_texts=VAL, **params, **kw)
        assert set(maps) == {(s, t) for s in POINTS_A for t in POINTS_B}
        for (s, t), m in maps.items():
            ref = make()
            if kind == "affine":
                ref.fit_stats(
                    CrossStats.from_data(xs[s], ys[t]), val_stats=CrossStats.from_data(xv[s], yv[t])
                )
                assert m.alpha_ == pytest.approx(ref.alpha_, rel=1e-9)
            else:
                ref.fit(xs[s], ys[t])
            torch.testing.assert_close(m.weight_, ref.weight_, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m.bias_, ref.bias_, rtol=1e-6, atol=1e-6)
            assert m.n_samples_ == ref.n_samples_
            prov = m.provenance
            assert set(PROVENANCE_KEYS) <= set(prov)
            assert (prov["source"], prov["target"]) == (s, t)
            assert (prov["model_id_a"], prov["config_hash_b"]) == (
                tiny_pair.a.model_id,
                tiny_pair.b.config_hash,
            )
            assert prov["positions"]["drop_first"] == 1 and prov["alignment"] == "last"
            assert prov["bridge_mode"] == "hf" and prov["library_version"] == xa.__version__
    # a subset of pairs, and cv without val_texts (a held-out share of the texts)
    some = fit_grid(tiny_pair, TEXTS, POINTS_A, POINTS_B, alpha="cv", pairs=[(POINTS_A[0], POINTS_B[1])])
    assert list(some) == [(POINTS_A[0], POINTS_B[1])] and some[POINTS_A[0], POINTS_B[1]].alpha_ > 0
    with pytest.raises(ValueError, match="kind must be"):
        fit_grid(tiny_pair, TEXTS, POINTS_A, POINTS_B, kind="mlp")
    with pytest.raises(TypeError, match="hyper-parameter"):
        fit_grid(tiny_pair, TEXTS, POINTS_A, POINTS_B, kind="procrustes", rank=3)


def test_load_refuses_a_map_of_other_models(tiny_pair, tmp_path):
    (m,) = fit_grid(tiny_pair, TEXTS, [SRC], [TGT], kind="procrustes").values()
    path = m.save(tmp_path / "m.safetensors")
    assert torch.equal(load(path, a=tiny_pair.a, b=tiny_pair.b).weight_, m.weight_)
    with pytest.raises(ValueError, match="was fit for model A"):
        load(path, a=tiny_pair.b, b=tiny_pair.b)
    with pytest.raises(ValueError, match="was fit for model B"):
        load(path, b=SimpleNamespace(model_id=tiny_pair.b.model_id, config_hash="0" * 16))
    assert xm.read_metadata(path)["provenance"]["target"] == TGT


# -- real models ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_affine_map_between_real_models_beats_shuffled_control(smollm2, gemma3):
    """SmolLM2-135M resid_post.15 -> Gemma-3-270M resid_post.9 on pydoc prose.

    Measured (24 train / 8 held-out passages cut to 400 chars, ~1900 / ~690 rows): held-out
    R^2 0.57 with drop_first=1 against -0.005 for the map fit on shuffled pairs; without the
    filter the first text token's massive activations (norm ~3000 against ~200) pull R^2 to 0.16.
    """
    pair = xa.ModelPair(smollm2, gemma3)
    corpus = xa.corpus.load("pydoc")
    train = [t[:400] for t in corpus.train[:24]]
    test = [t[:400] for t in corpus.held_out[:8]]
    src, tgt = "resid_post.15", "resid_post.9"
    X, Y = rows(pair, train, src, tgt, drop_first=1, batch_size=8)
    Xt, Yt = rows(pair, test, src, tgt, drop_first=1, batch_size=8)
    real = Affine(alpha="cv").fit(X, Y).score(Xt, Yt)["r2"]
    perm = torch.randperm(Y.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = Affine(alpha="cv").fit(X, Y[perm]).score(Xt, Yt)["r2"]
    print(f"held-out R^2: real {real:.3f}, shuffled pairs {shuffled:.3f} (n={X.shape[0]}/{Xt.shape[0]})")
    assert shuffled < 0.05
    assert real > shuffled + 0.3
