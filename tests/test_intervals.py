"""Bootstrap intervals over texts on the effects of mapped patches (`effects.intervals`)."""

from __future__ import annotations

import pytest
import torch

import xlens_align as xa
from xlens_align.effects.intervals import bootstrap_effect, resample_weights

TEXTS = [
    "The cat sat on the mat and looked out of the window.",
    "Unbelievably, tokenization differs: 12345 apples!",
    "A short one, with a comma.",
    "Rivers flow to the sea; the sea does not fill.",
    "def f(x):\n    return x * 2  # doubled",
    "In 1969, two people walked on the Moon.",
    "Colourless green ideas sleep furiously, they said.",
    "She sells sea shells by the sea shore.",
]
# random-init models: zeroing a point can lower B's loss (recovered's scale inverted); the
# intervals are checked against the point estimates whatever their sign
pytestmark = pytest.mark.filterwarnings("ignore:the ablation at:RuntimeWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Noisy:
    """B's own rows would recover 1; A's rows through a fixed random map recover less."""

    def __init__(self, d_in: int, d_out: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(d_in, d_out, generator=g) * 0.05

    def transform(self, X):
        return X.float() @ self.W


def _measure(pair, texts, **kw):
    m = Noisy(pair.a.d_model, pair.b.d_model)
    return xa.effects.measure(
        pair, m, source="resid_post.0", target="resid_post.0", texts=texts, ablation="zero", **kw
    )


def test_interval_contains_point_and_matches_bootstrap_by_hand(tiny_pair):
    e = _measure(tiny_pair, TEXTS, n_boot=200, level=0.9, seed=3)
    assert e.n_boot == 200 and e.ci_level == 0.9
    for name, point in (("recovered", e.recovered), ("kl", e.kl), ("top1", e.top1_agreement)):
        lo, hi = getattr(e, f"{name}_ci")
        assert lo <= point <= hi, (name, lo, point, hi)
        assert hi > lo  # eight different texts: the interval has width
    d = e.as_dict()
    assert d["recovered_ci"] == e.recovered_ci and d["kl_ci"] == e.kl_ci and d["top1_ci"] == e.top1_ci
    # the same seed gives the same interval; the numbers do not depend on n_boot=0's path
    e0 = _measure(tiny_pair, TEXTS)
    assert e0.recovered_ci is None and e0.kl_ci is None and e0.top1_ci is None and e0.n_boot == 0
    assert e0.recovered == e.recovered and e0.kl == e.kl
    assert _measure(tiny_pair, TEXTS, n_boot=200, level=0.9, seed=3).recovered_ci == e.recovered_ci


def test_per_text_sums_add_up_to_the_point_estimate(tiny_pair):
    m = Noisy(tiny_pair.a.d_model, tiny_pair.b.d_model)
    g = xa.effects.grid(
        tiny_pair, {("resid_post.0", "resid_post.0"): m}, TEXTS, ablation="zero", batch_size=3
    )
    e = g.effects["resid_post.0", "resid_post.0"]
    p, c = g.text_sums["resid_post.0", "resid_post.0"], g.text_sums["clean"]
    assert p.shape == (len(TEXTS), 4) and p.dtype == torch.float64
    assert int(p[:, 3].sum()) == e.n_tokens and bool((p[:, 3] > 0).all())
    assert float(p[:, 1].sum() / p[:, 3].sum()) == pytest.approx(e.kl, rel=1e-12)
    assert float(c[:, 0].sum() / c[:, 3].sum()) == pytest.approx(e.ce_clean, rel=1e-12)
    # weights of all ones reproduce the point estimate exactly
    ones = torch.ones(1, len(TEXTS), dtype=torch.float64)
    ci = bootstrap_effect(c, p, g.text_sums["ablated", "resid_post.0"], ones, 0.5)
    assert ci["recovered_ci"][0] == pytest.approx(e.recovered, rel=1e-12)
    assert ci["top1_ci"][0] == pytest.approx(e.top1_agreement, rel=1e-12)


def test_identical_texts_collapse_the_interval(tiny_pair):
    e = _measure(tiny_pair, [TEXTS[0]] * 6, n_boot=100)
    for name, point in (("recovered", e.recovered), ("kl", e.kl), ("top1", e.top1_agreement)):
        lo, hi = getattr(e, f"{name}_ci")
        assert lo == pytest.approx(point, abs=1e-12) and hi == pytest.approx(point, abs=1e-12)


def test_grid_intervals_and_table(tiny_pair):
    d_a, d_b = tiny_pair.a.d_model, tiny_pair.b.d_model
    maps = {
        ("resid_post.0", "resid_post.0"): Noisy(d_a, d_b),
        ("resid_post.1", "resid_post.0"): Noisy(d_a, d_b, 1),
    }
    g = xa.effects.grid(tiny_pair, maps, TEXTS, ablation="zero", n_boot=50)
    assert g.extra["bootstrap"] == {"n_boot": 50, "level": 0.95, "seed": 0, "over": "texts"}
    for e in g.effects.values():
        assert e.recovered_ci[0] <= e.recovered <= e.recovered_ci[1]
    text = g.table().text
    assert "recovered_ci" in text.splitlines()[0]
    assert "recovered_ci" not in xa.effects.grid(tiny_pair, maps, TEXTS, ablation="zero").table().text


def test_resample_weights_draw_every_text_count_times():
    w = resample_weights(7, 1000, seed=1)
    assert w.shape == (1000, 7) and bool((w.sum(1) == 7).all())
    assert float(w.mean()) == 1.0 and abs(float(w[:, 0].mean()) - 1.0) < 0.1


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"n_boot": -1}, "n_boot"), ({"n_boot": 2.5}, "n_boot"), ({"n_boot": 10, "level": 1.0}, "level"),
     ({"n_boot": 10, "level": 0}, "level"), ({"n_boot": 10, "level": "high"}, "level")],
)  # fmt: skip
def test_bad_bootstrap_arguments_name_the_argument(tiny_pair, kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        _measure(tiny_pair, TEXTS[:2], **kw)
    with pytest.raises((ValueError, TypeError), match=name):
        xa.effects.grid(tiny_pair, {("resid_post.0", "resid_post.0"): Noisy(64, 64)}, TEXTS[:2], **kw)
