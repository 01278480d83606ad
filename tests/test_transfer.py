"""xa.transfer on tiny models: steering vectors, their transfer through a map, probes, the
cross-model lens. Closed forms where there are some: at B's ``final`` point a vector v changes the
log-odds of tokens p, n by exactly ``v . (W_U[:, p] - W_U[:, n])``."""

from __future__ import annotations

import pytest
import torch

import xlens_align as xa
from xlens_align.transfer import templates

POINT = "resid_post.0"
PROMPTS = list(templates.STEER_PROMPTS[:4])
NEUTRAL = list(templates.NEUTRAL[:3])


@pytest.fixture(scope="module")
def model(tiny_llama_ref):
    """The session's 3-layer tiny Llama (`test_planted_direction_is_recovered` edits one embedding
    row and puts it back)."""
    return tiny_llama_ref[0]


def _identity(d: int):
    """An Affine map fit on X -> X (exactly the identity, to float64 rounding)."""
    X = torch.randn(4 * d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return xa.maps.Affine(alpha=0.0).fit(X, X)


def _readout(model, targets=templates.STEER_TARGETS) -> torch.Tensor:
    """``W_U[:, p] - W_U[:, n]`` of the model's unembedding (float64)."""
    p, n = xa.transfer.target_ids(model, targets)
    W = model.hf_model.get_output_embeddings().weight.detach().to(torch.float64)
    return W[p] - W[n]


def test_identity_map_reproduces_the_native_vector(model):
    pos, neg = templates.sentiment()
    v = xa.transfer.steering_vector(model, pos[:12], neg[:12], POINT, progress=False)
    s = xa.transfer.activation_norm(model, NEUTRAL, POINT, progress=False)
    m = _identity(model.d_model)
    w = xa.transfer.transfer_direction(m, v, norms=(s, s))
    assert torch.allclose(w, v, atol=1e-12, rtol=1e-10)

    # the same through the non-linear path: the mean of map(x + v) - map(x) over rows
    class Same:
        def transform(self, X):
            return X.clone()

    rows = torch.randn(5, model.d_model, dtype=torch.float64)
    assert torch.allclose(xa.transfer.transfer_direction(Same(), v, rows=rows), v, atol=1e-12)
    t = xa.transfer.steering_effects(
        model, POINT, {"native": v * 50, "transferred": w * 50}, prompts=PROMPTS,
        targets=templates.STEER_TARGETS, neutral=NEUTRAL, alpha=2.0, reference="native", n_boot=50,
        progress=False,
    )  # fmt: skip
    assert float(t.d_log_odds["native"].abs().max()) > 1e-3  # the vector does something
    assert torch.allclose(t.d_log_odds["transferred"], t.d_log_odds["native"], atol=1e-6, rtol=0)
    assert torch.allclose(t.d_ce["transferred"], t.d_ce["native"], atol=1e-6, rtol=0)
    row = {r["vector"]: r for r in t.rows()}["transferred"]
    assert row["fraction"] == pytest.approx(1.0, abs=1e-6)
    assert row["fraction_ci"] == pytest.approx((1.0, 1.0), abs=1e-6)
    assert "transferred" in t.text and t.as_dict()["reference"] == "native"


def test_log_odds_change_at_final_is_the_readout_projection(model):
    u = _readout(model)
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = xa.transfer.steering_effects(
        model, "final", {"readout": u, "v": v}, prompts=PROMPTS, targets=templates.STEER_TARGETS,
        neutral=NEUTRAL, alpha=0.5, n_boot=50, progress=False,
    )  # fmt: skip
    for name, vec in (("readout", u), ("v", v)):
        want = 0.5 * float(vec @ u)
        assert torch.allclose(
            t.d_log_odds[name], torch.full((len(PROMPTS),), want, dtype=torch.float64), atol=1e-4
        )


def test_random_map_does_no_better_than_a_random_vector(model):
    """B's own readout direction moves the log-odds by |u|^2; the same direction sent through a
    random linear map (rescaled to the same norm) moves them no more than random vectors do."""
    u = _readout(model)
    d = model.d_model
    native = float(u @ u)

    def effect(vec: torch.Tensor) -> float:
        with xa.transfer.steer(model, "final", vec):
            lo = xa.transfer.log_odds(model, PROMPTS[:1], templates.STEER_TARGETS)
        return float(lo[0] - clean[0])

    clean = xa.transfer.log_odds(model, PROMPTS[:1], templates.STEER_TARGETS)
    assert effect(u) == pytest.approx(native, rel=1e-4)
    by_map, by_vec = [], []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        X, Y = (torch.randn(3 * d, d, generator=g, dtype=torch.float64) for _ in range(2))
        w = xa.transfer.transfer_direction(xa.maps.Affine(alpha=0.0).fit(X, Y), u, norms=(1.0, 1.0))
        assert float(w.norm()) == pytest.approx(float(u.norm()), rel=1e-9)
        by_map.append(effect(w))
        r = torch.randn(d, generator=g, dtype=torch.float64)
        by_vec.append(effect(r * (u.norm() / r.norm())))
    by_map, by_vec = torch.tensor(by_map), torch.tensor(by_vec)
    # random directions: mean 0 with spread |u|^2 / sqrt(d); both far from the native effect
    spread = native / d**0.5
    assert abs(float(by_map.mean())) < 3 * spread / 10**0.5 + 1e-9
    assert abs(float(by_vec.mean())) < 3 * spread / 10**0.5 + 1e-9
    assert float(by_map.abs().max()) < 0.6 * native
    lo, hi = float(by_vec.min()), float(by_vec.max())
    assert lo - spread <= float(by_map.mean()) <= hi + spread


@pytest.fixture
def planted(model):
    """(model, u): the model with the embedding of " good" set to that of " bad" plus u (restored after)."""
    p, n = xa.transfer.target_ids(model, templates.STEER_TARGETS)
    u = torch.randn(model.d_model, generator=torch.Generator().manual_seed(2))
    emb = model.hf_model.get_input_embeddings().weight
    saved = emb[p].detach().clone()
    with torch.no_grad():
        emb[p] = emb[n] + u
    yield model, u
    with torch.no_grad():
        emb[p] = saved


def test_planted_direction_is_recovered(planted):
    m, u = planted
    stems = ["The movie was", "I think it is", "Honestly, that was very", "Their food is"]
    pos, neg = (
        [s + templates.STEER_TARGETS[0] for s in stems],
        [s + templates.STEER_TARGETS[1] for s in stems],
    )
    v = xa.transfer.steering_vector(m, pos, neg, "embed", reduce="last", progress=False)
    assert torch.allclose(v, u.double(), atol=1e-6)
    # adding v at the last position of the negative texts turns them into the positive ones
    ids_n, mask = m.to_tokens(neg)
    ids_p, _ = m.to_tokens(pos)
    last = (torch.arange(len(neg)), mask.sum(1) - 1)
    with xa.transfer.steer(m, "embed", v, positions=last):
        steered = m.forward(ids_n, mask)
    assert torch.allclose(steered, m.forward(ids_p, mask), atol=1e-4)
    # a vector planted by hand in every text's stream is found again at that point
    with xa.transfer.steer(m, POINT, u):
        planted = xa.transfer.pooled(m, neg, POINT, progress=False)
    clean = xa.transfer.pooled(m, neg, POINT, progress=False)
    assert torch.allclose((planted - clean).mean(0), u.double(), atol=1e-5)


def _sentiment_rows(model):
    texts, y = templates.labelled("sentiment")
    texts, y = texts[::3], y[::3]
    X = xa.transfer.pooled(model, texts, POINT, progress=False)
    tr, te = xa.files.split_indices(len(texts), 0.3, 0)
    return X, torch.tensor(y), tr, te


def test_probe_through_identity_equals_own_probe(model):
    X, y, tr, te = _sentiment_rows(model)
    own = xa.transfer.fit_probe(X[tr], y[tr])
    a_probe = xa.transfer.fit_probe(X[tr], y[tr])  # A = B: A's probe on A's rows
    m = _identity(model.d_model)
    pinv = xa.transfer.transfer_probe(m, a_probe, method="pinv")
    assert torch.allclose(pinv.weight, own.weight, atol=1e-9 * float(own.weight.abs().max()))
    assert pinv.bias == pytest.approx(own.bias, abs=1e-8)
    refit = xa.transfer.transfer_probe(m, a_probe, method="refit", rows=X[tr], labels=y[tr])
    t = xa.transfer.probe_accuracy({"own": own, "pinv": pinv, "refit": refit}, X[te], y[te], n_boot=50)
    acc = {r["probe"]: r["accuracy"] for r in t.rows()}
    assert acc["pinv"] == acc["own"] and acc["refit"] == acc["own"]
    assert t.chance == pytest.approx(max(float(y[te].double().mean()), 1 - float(y[te].double().mean())))


def test_probe_through_an_invertible_map_scores_like_the_source():
    """B's rows = A's rows sent through a known invertible affine map: the pinv-transferred probe
    gives B's rows exactly A's probe scores."""
    g = torch.Generator().manual_seed(5)
    d = 16
    y = torch.arange(200) % 2
    Xa = torch.randn(200, d, generator=g, dtype=torch.float64) + 1.5 * y[:, None].double() * torch.ones(d)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] * 3.0
    Xb = Xa @ Q + 2.0
    m = xa.maps.Affine(alpha=0.0).fit(Xa, Xb)
    p = xa.transfer.fit_probe(Xa, y)
    q = xa.transfer.transfer_probe(m, p)
    assert torch.allclose(q.scores(Xb), p.scores(Xa), atol=1e-8)
    assert float(p.correct(Xa, y).mean()) > 0.9


def test_lens_through_a_perfect_map_equals_own_logits(model):
    ids, mask = model.to_tokens(["The capital of France is", "Water boils at"])
    logits = model.forward(ids, mask)
    m = _identity(model.d_model).bind(target="final")
    assert torch.allclose(xa.transfer.cross_logits(model, model, m, ids, mask, "final"), logits, atol=1e-4)
    assert torch.allclose(xa.transfer.own_lens(model, ids, mask, "final"), logits, atol=1e-5)
    assert torch.allclose(xa.transfer.own_lens(model, ids, mask, "resid_post.-1"), logits, atol=1e-5)
    view = xa.transfer.cross_lens(model, model, m, ["The capital of France is"], "final", k=2)
    assert view.own == view.cross and len(view.tokens[0]) == int(mask[0].sum())
    assert view.own[0][-1][0][0] == model.tokenizer.decode([int(logits[0, int(mask[0].sum()) - 1].argmax())])
    assert "B via map" in view.text()
    with pytest.raises(ValueError, match="'final'"):
        xa.transfer.cross_logits(
            model, model, _identity(model.d_model).bind(target=POINT), ids, mask, "final"
        )


def test_bad_input(model):
    tr = xa.transfer
    v = torch.zeros(model.d_model, dtype=torch.float64)
    with pytest.raises(ValueError, match="vector must have shape"):
        with tr.steer(model, POINT, torch.zeros(3)):
            pass
    with pytest.raises(ValueError, match="alpha"):
        with tr.steer(model, POINT, v, alpha=float("nan")):
            pass
    with pytest.raises(TypeError, match="positions"):
        with tr.steer(model, POINT, v, positions=[0, 1]):
            pass
    with pytest.raises(ValueError, match="valid"):
        with tr.steer(model, "resid_post.99", v):
            pass
    with pytest.raises(ValueError, match="reduce"):
        tr.steering_vector(model, ["a b"], ["c d"], POINT, reduce="max")
    with pytest.raises(TypeError, match="positive_texts"):
        tr.steering_vector(model, "a b", ["c d"], POINT)
    with pytest.raises(ValueError, match="one token"):
        tr.target_ids(model, (" good", " extraordinarilyunlikelyword"))
    with pytest.raises(ValueError, match="not a linear map"):
        tr.transfer_direction(xa.maps.MLP(), v)
    with pytest.raises(ValueError, match="shape"):
        tr.transfer_direction(_identity(model.d_model), torch.zeros(3))
    with pytest.raises(ValueError, match="inf/NaN"):
        tr.transfer_direction(_identity(model.d_model), torch.full((model.d_model,), float("nan")))
    with pytest.raises(ValueError, match="norms"):
        tr.transfer_direction(_identity(model.d_model), v + 1, norms=(1.0, -1.0))
    with pytest.raises(ValueError, match="zero vector"):
        tr.transfer_direction(_identity(model.d_model), v, norms=(1.0, 1.0))
    X = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="one class"):
        tr.fit_probe(X, [1] * 10)
    with pytest.raises(ValueError, match="0 or 1"):
        tr.fit_probe(X, [0, 1, 2] + [0] * 7)
    with pytest.raises(TypeError, match="integers"):
        tr.fit_probe(X, torch.zeros(10))
    p = tr.fit_probe(X, [0, 1] * 5)
    with pytest.raises(ValueError, match="method"):
        tr.transfer_probe(_identity(4), p, method="lstsq")
    with pytest.raises(ValueError, match="refit"):
        tr.transfer_probe(_identity(4), p, method="refit")
    with pytest.raises(ValueError, match="reference"):
        tr.steering_effects(model, POINT, {"v": v}, prompts=PROMPTS, targets=templates.STEER_TARGETS,
                            neutral=NEUTRAL, reference="own")  # fmt: skip
    with pytest.raises(ValueError, match="name must be one of"):
        templates.labelled("weather")
